"""Checks and short renderings of untrusted values, for the error messages of trigger specs and files."""

from __future__ import annotations

import numbers
import reprlib
from typing import Any

import numpy as np

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxtuple, _SHORT_REPR.maxdict = 2, 4, 4, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother, _SHORT_REPR.maxlong = 50, 50, 40


def is_int(value: Any) -> bool:
    # bool is a subclass of int, but `size: true` is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def num(value: float) -> str:
    return f"{value:g}"


def clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """A short rendering of a possibly hostile value for an error message. reprlib bounds the work:
    YAML aliases can nest shared lists into a structure whose full repr would be astronomically long."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # noqa: BLE001 - never let a message fail
        text = f"<{type(value).__name__}>"
    return clip(text, 60)
