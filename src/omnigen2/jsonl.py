"""JSON Lines as the format defines it, for training data, batch records and benchmark rows.

Records are separated by "\\n" only: ``str.splitlines`` would also split on U+2028, U+2029, U+0085 and control
characters that JSON allows inside strings, rejecting valid records and shifting every later line number. A
"\\r" before the "\\n" (Windows files), a UTF-8 BOM at the start and blank lines are accepted."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator


def lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, bytes) of the non-blank lines of a JSON Lines file's contents."""
    data = data.removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if raw.strip(b" \t\r"):
            yield lineno, raw


def decode(raw: bytes):
    """The JSON value of one line; ValueError with a short reason (not UTF-8, not JSON, nested too deeply) for the
    caller to prefix with ``file:line``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None


def decode_object(raw: bytes, kind: str = "a record") -> dict:
    """:func:`decode`, and a JSON object (``kind`` names it in the error)."""
    obj = decode(raw)
    if not isinstance(obj, dict):
        raise ValueError(f"{kind} must be a JSON object, got {type(obj).__name__}")
    return obj
