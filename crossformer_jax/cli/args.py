"""argparse types shared by the command lines."""

from __future__ import annotations

import argparse
import re


def image_size(text: str) -> tuple[int, int]:
    """argparse type: SIZE or HEIGHTxWIDTH, positive multiples of 32."""
    match = re.fullmatch(r'\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?', text)
    if not match:
        raise argparse.ArgumentTypeError(f'expected SIZE or HEIGHTxWIDTH, got {text!r}')
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) else h
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(
            f'image size must be positive multiples of 32, got {h}x{w}'
        )
    return h, w


def positive_float(text: str) -> float:
    """argparse type: a positive number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f'expected a positive number, got {text!r}')
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value
