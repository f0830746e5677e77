"""Checking a model's answer against the reference: the rules jobs.evaluate scores with and
verifiable rewards reuse."""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> float | None:
    """GSM8K-style: the number after the last `####`, else the last number in the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        return float(found[0].replace(",", "")) if found else None
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def normalize(text: str) -> str:
    return " ".join(text.split()).strip(" .,:;!?\"'").lower()


def is_correct(prediction: str, answer: str, match: str) -> bool:
    if match == "number":
        want, got = extract_number(answer), extract_number(prediction)
        return want is not None and got is not None and math.isclose(want, got, rel_tol=0, abs_tol=1e-6)
    return normalize(prediction) == normalize(answer)
