"""The attribute schema of stage 2: five attributes, their vocabularies, and a forgiving parser.

The vocabularies double as the paper's "concept dictionary": the text CSV stores each
attribute as its index in the tuple below (the number is stored as itself). Reordering or
removing a word changes the codes of existing CSVs, so only append.

`parse_answer` turns whatever a vision-language model wrote into validated `Attributes` or
raises `AnswerError` (a `CoTexNetError`): the caller retries or falls back, it never loops.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from dataclasses import asdict, dataclass

from common.errors import CoTexNetError

KEYS = ("number", "location", "shape", "size", "color")
LOCATIONS = ("center", "top left", "top right", "bottom left", "bottom right",
             "left", "right", "top center", "bottom center")
SHAPES = ("round", "oval", "irregular", "elongated", "lobulated", "flat", "triangular", "crescent")
SIZES = ("small", "medium", "large")
COLORS = ("pink", "red", "orange", "yellow", "white", "brown", "purple", "gray", "black", "green", "blue")
VOCABULARIES = {"location": LOCATIONS, "shape": SHAPES, "size": SIZES, "color": COLORS}
# Upper bound of `number` in the constrained grammar; the parser then clips to the mask's count.
MAX_NUMBER = 50
# Longer answers are not an answer to this question (and keep literal_eval cheap).
MAX_ANSWER_CHARS = 20_000

# Words models use for a vocabulary entry; matched after lower-casing and trimming.
SYNONYMS = {
    "circular": "round", "rounded": "round", "circle": "round", "spherical": "round", "roundish": "round",
    "oval-shaped": "oval", "ovoid": "oval", "elliptical": "oval", "ellipse": "oval", "oblong": "oval",
    "irregularly shaped": "irregular", "irregular-shaped": "irregular", "amorphous": "irregular",
    "lobular": "lobulated", "lobed": "lobulated", "flattened": "flat", "sessile": "flat",
    "tiny": "small", "little": "small", "moderate": "medium", "mid": "medium", "medium-sized": "medium",
    "big": "large", "huge": "large", "small-sized": "small", "large-sized": "large",
    "grey": "gray", "reddish": "red", "pinkish": "pink", "yellowish": "yellow", "whitish": "white",
    "brownish": "brown", "purplish": "purple", "violet": "purple", "greyish": "gray", "grayish": "gray",
    "dark": "black", "tan": "brown", "beige": "brown", "flesh": "pink", "salmon": "pink",
}
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
# Words that may surround the position words ("the upper left corner of the image").
_LOCATION_FILLER = {"the", "of", "image", "in", "at", "on", "corner", "side", "part", "region", "area",
                    "portion", "quadrant", "section", "and", "a", "picture", "frame", "located", "slightly"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_MIDDLE = {"center", "centre", "middle", "central", "centered", "centred"}


class AnswerError(CoTexNetError):
    """A model answer that cannot be read as the five attributes."""


@dataclass(frozen=True)
class Attributes:
    number: int
    location: str
    shape: str
    size: str
    color: str

    def codes(self) -> dict[str, int]:
        """The concept-dictionary codes: the number itself, else the index in the vocabulary."""
        return {"number": self.number, **{k: VOCABULARIES[k].index(getattr(self, k)) for k in VOCABULARIES}}

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _position(horizontal: str | None, vertical: str | None) -> str:
    """The paper's position word for a (horizontal, vertical) pair; None means middle."""
    if vertical:
        return f"{vertical} {horizontal or 'center'}"
    return horizontal or "center"


def location_words(cx: float, cy: float) -> str:
    """Position words of a point in normalised image coordinates (x right, y down, 0..1)."""
    if abs(cx - 0.5) <= 0.1 and abs(cy - 0.5) <= 0.1:
        return "center"
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else None
    vertical = "top" if cy < 0.4 else "bottom" if cy > 0.6 else None
    return _position(horizontal, vertical)


def box_words(box) -> str:
    """Position words of a box [x0, y0, x1, y1] in 0..1, from its centre."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise AnswerError(f"box {list(box)} is not in 0..1 image coordinates")
    return location_words((x0 + x1) / 2, (y0 + y1) / 2)


def normalise(value: str) -> str:
    """Unicode-compatible, lower case, single spaces, no surrounding punctuation."""
    text = unicodedata.normalize("NFKC", value).lower().replace("_", " ")
    return " ".join(text.split()).strip(" .,;:!\"'`")


def _load_object(text: str) -> dict:
    """The outermost {...} of an answer (drops code fences and chatter around the JSON), parsed."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise AnswerError("no JSON object in the answer")
    body = text[start:end + 1]
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        # Single-quoted dicts (Python reprs) are common in LLaVA answers.
        try:
            obj = ast.literal_eval(body)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
            raise AnswerError(f"answer is not JSON: {type(err).__name__}") from None
    if not isinstance(obj, dict):
        raise AnswerError("answer is not a JSON object")
    return obj


def _number(value, max_number: int | None) -> int:
    if isinstance(value, bool):
        raise AnswerError("number is a boolean")
    if isinstance(value, str):
        word = normalise(value)
        if word in NUMBER_WORDS:
            value = NUMBER_WORDS[word]
        else:
            if not re.fullmatch(r"[+-]?\d+(\.\d+)?", word):
                raise AnswerError(f"number {value!r} is not a number")
            value = float(word)
    if not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise AnswerError(f"number {value!r} is not a number")
    # Real answers hold 0.08 or 2012: at least one region (there is a mask), at most what the mask shows.
    number = max(1, round(value)) if abs(value) < 1e12 else MAX_NUMBER
    upper = MAX_NUMBER if max_number is None else max(1, max_number)
    return min(number, upper)


def _box(value) -> list[float] | None:
    """A box as four numbers, from a list or from a string such as "[0.1, 0.2, 0.5, 0.6]"."""
    if isinstance(value, str):
        found = re.findall(r"-?\d+(?:\.\d+)?", value)
        if len(found) != 4 or re.search(r"[a-z]", normalise(value)):
            return None
        value = [float(v) for v in found]
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def parse_location(value) -> str:
    """The paper's position words from words in any order/spelling, or from a box."""
    box = _box(value)
    if box is not None:
        return box_words(box)
    if not isinstance(value, str):
        raise AnswerError(f"location {value!r} is not words or a box")
    words = re.split(r"[\s\-/,]+", normalise(value))
    horizontal = vertical = None
    for word in filter(None, words):
        if word in _VERTICAL:
            vertical = _VERTICAL[word]
        elif word in _HORIZONTAL:
            horizontal = word
        elif word not in _MIDDLE and word not in _LOCATION_FILLER:
            raise AnswerError(f"location {value!r} has no position word for {word!r}")
    if not any(w in _VERTICAL or w in _HORIZONTAL or w in _MIDDLE for w in words):
        raise AnswerError(f"location {value!r} names no position")
    return _position(horizontal, vertical)


def parse_word(key: str, value) -> str:
    """A vocabulary word for shape/size/color: exact, synonym, or the last known word of a phrase."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise AnswerError(f"{key} {value!r} is not a word")
    vocabulary = VOCABULARIES[key]
    text = normalise(value)
    for word in (text, *reversed(re.split(r"[\s\-/,]+", text))):
        word = SYNONYMS.get(word, word)
        if word in vocabulary:
            return word
    raise AnswerError(f"{key} {value!r} is not one of {', '.join(vocabulary)}")


def validate(obj: dict, max_number: int | None = None) -> Attributes:
    """Attributes from a dict with (at least) the five keys; extra keys are ignored."""
    fields = {normalise(str(k)).replace("colour", "color"): v for k, v in obj.items()}
    missing = [k for k in KEYS if k not in fields]
    if missing:
        raise AnswerError(f"answer lacks {', '.join(missing)}")
    number, location = _number(fields["number"], max_number), parse_location(fields["location"])
    return Attributes(number, location, *(parse_word(key, fields[key]) for key in ("shape", "size", "color")))


def parse_answer(text, max_number: int | None = None) -> Attributes:
    """Validated attributes from a model's answer; `max_number` = external contours of the mask."""
    if not isinstance(text, str):
        raise AnswerError(f"answer is {type(text).__name__}, not text")
    if len(text) > MAX_ANSWER_CHARS:
        raise AnswerError(f"answer is {len(text)} characters long")
    return validate(_load_object(text), max_number)


def json_schema(max_number: int = MAX_NUMBER) -> dict:
    """The schema for grammar-constrained decoding: a bounded integer and four enums (a free string
    never has to close, and weak models then run to the token limit)."""
    properties = {"number": {"type": "integer", "minimum": 1, "maximum": max_number}}
    properties.update({k: {"type": "string", "enum": list(v)} for k, v in VOCABULARIES.items()})
    return {"type": "object", "properties": properties, "required": list(KEYS), "additionalProperties": False}
