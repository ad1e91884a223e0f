"""The paper's sentence template: attributes -> the text prompt of one ROI.

The writer of the text CSV, the reader for training and the concept readout all build the
sentence here, so that an attribute reads the same everywhere.
"""

from __future__ import annotations

from llava_inference.attributes import Attributes


def plural(keyword: str) -> str:
    """English plural of the keyword's last word: "polyp area" -> "polyp areas"."""
    if keyword.endswith(("s", "x", "z", "ch", "sh")):
        return keyword + "es"
    if keyword.endswith("y") and keyword[-2:-1] not in tuple("aeiou"):
        return keyword[:-1] + "ies"
    return keyword + "s"


def sentence(attrs: Attributes, keyword: str) -> str:
    """The paper's template; locations are normalised words, so "of the image" appears once."""
    noun = plural(keyword) if attrs.number > 1 else keyword
    return (f"{attrs.number} {attrs.shape} {attrs.size} {attrs.color} {noun}, "
            f"located in the {attrs.location} of the image.")


def empty_sentence(keyword: str) -> str:
    """The sentence of an ROI whose mask is empty (a category absent from an image): the paper's
    template cannot say "none", so the sentence is its own."""
    return f"no {plural(keyword)} in the image."
