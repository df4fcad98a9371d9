"""Argument checks shared by every module and the command line: one int validator, one float
validator. Each raises ``TypeError``/``ValueError`` naming the argument, the bad value and the valid
range, before any slow work starts; nothing is silently clipped or "fixed"."""
from __future__ import annotations

import math
from typing import Optional

__all__ = ["check_int", "check_count", "check_float", "one_line", "MAX_IMAGES"]

MAX_IMAGES = 4096  # upper bound of num_images in one call: 4096 Malevich images are hours on a GPU
# Limits that the command line's help shows, kept here so that building the parser imports no torch:
MAX_OUTPAINT_STEPS = 64  # one model call per step and per image; 64 steps of k=16 is a 32x wide panorama
TRAINABLE_PARTS = ("all", "attention", "mlp", "layernorm", "embeddings", "head")  # finetune(train=...)


def check_int(name: str, value: object, *, low: int = 1, high: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; ``high=None`` means no upper bound."""
    span = f"[{low}, {high}]" if high is not None else f">= {low}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int {span}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{span}, got {value}")
    return value


def check_count(name: str, value: object, high: Optional[int] = None) -> int:
    """``value`` if it is an int >= 1 (and <= ``high`` when given)."""
    return check_int(name, value, low=1, high=high)


def check_float(name: str, value: object, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a finite real number within the bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; NaN and +-inf are always refused,
    so a bound of ``None`` means "any finite value"."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    value = float(value)
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    span = (f"in {lo}, {hi}" if low is not None and high is not None
            else f"{'>' if low_open else '>='} {low}" if low is not None
            else f"{'<' if high_open else '<='} {high}" if high is not None else "finite")
    bad = (not math.isfinite(value)
           or (low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        raise ValueError(f"{name} must be a finite number {span}, got {value}")
    return value


def one_line(message: object) -> str:
    """``str(message)`` (an error or any text) with its whitespace, newlines included, collapsed to
    single spaces: error messages are printed as one line."""
    return " ".join(str(message).split())
