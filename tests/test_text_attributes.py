"""Parsing model answers, position words, and the sentence template."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import CoTexNetError
from llava_inference.attributes import (
    KEYS,
    AnswerError,
    Attributes,
    box_words,
    json_schema,
    location_words,
    parse_answer,
)
from llava_inference.sentence_template import plural, sentence

GOOD = '{"number": 1, "location": "center", "shape": "round", "size": "small", "color": "pink"}'


@pytest.mark.parametrize(("cx", "cy", "words"), [
    (0.5, 0.5, "center"), (0.59, 0.41, "center"), (0.2, 0.2, "top left"), (0.8, 0.1, "top right"),
    (0.1, 0.9, "bottom left"), (0.9, 0.9, "bottom right"), (0.1, 0.5, "left"), (0.9, 0.55, "right"),
    (0.5, 0.1, "top center"), (0.45, 0.95, "bottom center"), (0.55, 0.35, "top center"),
    # inside 0.4..0.6 both ways but more than 0.1 from the middle is impossible; the corner of the box:
    (0.39, 0.5, "left"), (0.61, 0.61, "bottom right"),
])
def test_location_words(cx, cy, words):
    assert location_words(cx, cy) == words


def test_box_words_use_the_centre():
    assert box_words([0.0, 0.0, 0.2, 0.3]) == "top left"
    assert box_words([0.3, 0.35, 0.7, 0.65]) == "center"
    with pytest.raises(AnswerError):
        box_words([0, 0, 200, 300])  # pixels, not 0..1


@pytest.mark.parametrize(("answer", "expected"), [
    (GOOD, Attributes(1, "center", "round", "small", "pink")),
    # code fence and chatter around the JSON, mixed case, spaces
    ('Sure! ```json\n{"number": 2, "location": " Top Left ", "shape": "OVAL", "size": "Small", "color": "Pink"}\n```',
     Attributes(2, "top left", "oval", "small", "pink")),
    # a Python dict (single quotes), extra keys, "colour", a box location, a number as a string
    ("{'number': '2', 'location': [0.6, 0.7, 0.9, 0.95], 'shape': 'irregularly shaped', 'size': 'big', "
     "'colour': 'reddish', 'texture': 'smooth'}", Attributes(2, "bottom right", "irregular", "large", "red")),
    # the box as a string, number as a word, phrase colours
    ('{"number": "three", "location": "[0.1, 0.4, 0.3, 0.6]", "shape": "round", "size": "medium-sized", '
     '"color": "light pink"}', Attributes(3, "left", "round", "medium", "pink")),
    # unicode: full-width letters, non-breaking space, British spelling
    ('{"number": 1, "location": "upper\u00a0centre of the image", "shape": "\uff52\uff4f\uff55\uff4e\uff44", '
     '"size": "small", "color": "grey"}', Attributes(1, "top center", "round", "small", "gray")),
    # real LLaVA numbers: a year is clipped to the mask's regions, a fraction rounds up to one region
    ('{"number": 2012, "location": "lower right corner", "shape": "oval", "size": "large", "color": "red"}',
     Attributes(3, "bottom right", "oval", "large", "red")),
    ('{"number": 0.08, "location": "middle left", "shape": "oval", "size": "large", "color": "red"}',
     Attributes(1, "left", "oval", "large", "red")),
])
def test_parse_messy_answers(answer, expected):
    assert parse_answer(answer, max_number=3) == expected


@pytest.mark.parametrize("answer", [
    "", "no JSON here", "[1, 2, 3]", '{"number": 1}',
    '{"number": 1, "location": "belly button", "shape": "round", "size": "small", "color": "pink"}',
    '{"number": 1, "location": "center", "shape": "pink", "size": "small", "color": "pink"}',
    '{"number": true, "location": "center", "shape": "round", "size": "small", "color": "pink"}',
    '{"number": "many", "location": "center", "shape": "round", "size": "small", "color": "pink"}',
    '{"number": NaN, "location": "center", "shape": "round", "size": "small", "color": "pink"}',
    '{"number": 1, "location": {"x": 1}, "shape": "round", "size": "small", "color": "pink"}',
    "{'number': 1, 'location': 'center', 'shape': 'round', 'size': 'small', 'color': pink}",
    None, 42,
])
def test_bad_answers_raise_answer_error(answer):
    with pytest.raises(AnswerError):
        parse_answer(answer)
    assert issubclass(AnswerError, CoTexNetError)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.dictionaries(st.sampled_from(KEYS + ("colour", "x")), json_values).map(repr),
                 st.dictionaries(st.sampled_from(KEYS), json_values).map(str)))
def test_no_answer_raises_anything_but_answer_error(text):
    try:
        attrs = parse_answer(text, max_number=4)
    except AnswerError:
        return
    assert 1 <= attrs.number <= 4
    assert all(isinstance(code, int) for code in attrs.codes().values())


def test_codes_and_schema_cover_the_vocabularies():
    attrs = Attributes(2, "top left", "oval", "large", "red")
    assert attrs.codes() == {"number": 2, "location": 1, "shape": 1, "size": 2, "color": 1}
    schema = json_schema()
    assert schema["required"] == list(KEYS) and schema["additionalProperties"] is False
    assert all("enum" in schema["properties"][k] for k in KEYS[1:])


def test_sentence_template_and_plurals():
    one = Attributes(1, "top left", "round", "small", "pink")
    two = Attributes(2, "center", "oval", "large", "red")
    assert sentence(one, "polyp area") == "1 round small pink polyp area, located in the top left of the image."
    assert sentence(two, "polyp area") == "2 oval large red polyp areas, located in the center of the image."
    assert plural("skin lesion area") == "skin lesion areas"
    assert plural("focus") == "focuses" and plural("opacity") == "opacities"
    assert "of the image of the image" not in sentence(two, "polyp area")
