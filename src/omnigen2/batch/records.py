"""Records of ``omnigen2 batch``: parse a JSON Lines file and check every record before any work.

A record is one image: ``{"id", "prompt", "input_images": [...] | null, "seed", "height", "width", ...}`` where
every field after ``prompt`` is one of ``omnigen2 generate``'s sampling flags, named by its ``dest`` (``steps``,
``text_guidance``, ``cfg_range``, ...) and defaulting to the value the batch command line gives it. Field types,
choices and defaults are read from ``generate``'s own flag definitions (``field_specs``), so a record means what
the same flags mean on ``omnigen2 generate``. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import jsonl
from ..limits import FLAGS, Limits
from ..limits import MAX_INPUT_IMAGES as MAX_REF_INPUTS

# The sampling flags of `omnigen2 generate` a record may set (argparse dest names). --num-images is left out:
# a record is one image (several seeds of one prompt are several records, each with its own id and file).
SAMPLING_FIELDS = (
    "seed",
    "steps",
    "height",
    "width",
    "text_guidance",
    "image_guidance",
    "negative_prompt",
    "cfg_range",
    "scheduler",
    "teacache",
    "taylorseer",
    "max_pixels",
    "max_input_side",
    "max_sequence_length",
    "align_res",
)
# Where the pipeline runs: per process, from the command line only.
RUN_FIELDS = ("model", "dtype", "device", "allow_pickle")
RECORD_FIELDS = ("id", "prompt", "input_images", *SAMPLING_FIELDS)

MAX_INPUT_IMAGES = MAX_REF_INPUTS  # as `generate` (and the pipeline's MAX_REF_IMAGES)
# The core bounds (omnigen2.limits; batch's --limit-* flags raise them): a record beyond one is refused while
# indexing.
LIMITS = Limits()
# The --limit-* flags of generate that bound a record (batch copies them).
LIMIT_FIELDS = ("steps", "images_per_prompt", "output_pixels", "prompt_tokens", "prompt_chars")
SEED_RANGE = (0, 2**64)  # torch.Generator.manual_seed takes [-2**63, 2**64); negative seeds are refused here
_SEGMENT = re.compile(r"[\w\-][\w.\-]*")  # one folder or file name of an id: no "..", no hidden names


@dataclass(frozen=True)
class FieldSpec:
    """How a record field is typed, read from the ``generate`` flag of the same ``dest``."""

    kind: str  # "int" | "float" | "str" | "bool" | "pair" (two floats)
    nullable: bool  # null allowed (the flag's default is None: "the model's")
    default: Any
    choices: tuple | None = None
    rule: Any = None  # the flag's range (omnigen2.cli.Number), applied to the record's value too


def field_specs(generate_parser: argparse.ArgumentParser) -> dict[str, FieldSpec]:
    """One ``FieldSpec`` per name of ``SAMPLING_FIELDS`` from the ``generate`` subparser's actions."""
    actions = {a.dest: a for a in generate_parser._actions}
    specs = {}
    for name in SAMPLING_FIELDS:
        if name not in actions:
            raise RuntimeError(f"`omnigen2 generate` has no flag with dest {name!r}; update batch.records")
        a = actions[name]
        if a.nargs == 0:
            kind = "bool"
        elif a.nargs == 2:
            kind = "pair"
        else:
            kind = {int: "int", float: "float", None: "str", str: "str"}[getattr(a.type, "kind", a.type)]
        default = list(a.default) if kind == "pair" else a.default
        rule = a.type if hasattr(a.type, "problem") else None
        specs[name] = FieldSpec(kind, a.default is None, default, tuple(a.choices) if a.choices else None, rule)
    return specs


@dataclass(frozen=True)
class Record:
    """One valid record. ``settings`` holds every sampling field, the command line's default where the record
    has none; ``input_images`` are the paths as written, ``image_paths`` resolved against the records' folder."""

    n: int  # 1-based line number in the records file
    where: str  # "RECORDS:n", the name as given on the command line
    id: str
    prompt: str
    input_images: tuple[str, ...]
    image_paths: tuple[Path, ...]
    settings: dict = field(hash=False)

    @property
    def file(self) -> str:
        """The output, relative to the output folder."""
        return f"{self.id}.png"

    def to_json(self) -> str:
        """The record as one JSON string (how a Ray Data row carries it)."""
        d = {k: getattr(self, k) for k in ("n", "where", "id", "prompt", "input_images", "settings")}
        return json.dumps({**d, "image_paths": [str(p) for p in self.image_paths]})

    @classmethod
    def from_json(cls, text: str) -> Record:
        d = json.loads(text)
        d["input_images"], d["image_paths"] = tuple(d["input_images"]), tuple(map(Path, d["image_paths"]))
        return cls(**d)


@dataclass(frozen=True)
class RecordError:
    """A line that is not a usable record; ``id`` when the line had a readable one."""

    n: int
    where: str
    reason: str
    id: str | None = None

    @property
    def message(self) -> str:
        return f"{self.where}: {self.reason}"


class _Bad(ValueError):
    pass


def parse_records(path: str | Path, specs: dict[str, FieldSpec], defaults: dict[str, Any], limits: Limits = LIMITS):
    """(records, errors) of a JSON Lines file (``omnigen2.jsonl``), both in line order; an id used twice is an
    error on every line after the first. ``defaults`` fill the sampling fields a record leaves out."""
    path = Path(path)
    base = path.resolve().parent
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the records file {str(path)!r}: {e.strerror or e}") from e
    records, errors, seen = [], [], {}
    for n, raw in jsonl.lines(data):
        where = f"{path}:{n}"
        try:
            obj = jsonl.decode_object(raw)
            rid = _check_id(obj.get("id"))
        except ValueError as e:
            errors.append(RecordError(n, where, str(e)))
            continue
        try:
            if rid in seen:
                raise _Bad(f"id {rid!r} is used already on line {seen[rid]}")
            seen[rid] = n
            records.append(_record(obj, rid, n, where, base, specs, defaults, limits))
        except _Bad as e:
            errors.append(RecordError(n, where, str(e), rid))
    return records, errors


def check_defaults(specs: dict[str, FieldSpec], defaults: dict[str, Any], limits: Limits = LIMITS) -> None:
    """Raise ValueError when the command line's sampling flags break a rule a record must follow."""
    try:
        _check_settings({k: defaults[k] for k in SAMPLING_FIELDS}, specs, limits)
    except _Bad as e:
        raise ValueError(f"command line: {e}") from None


def _check_id(rid) -> str:
    if rid is None:
        raise _Bad('missing "id" (the output is OUT/ID.png)')
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise _Bad(f'"id" must be a string, got {_json_type(rid)}')
    rid = str(rid)
    parts = rid.split("/")
    if len(rid) > 240 or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise _Bad(
            f'"id" {rid!r} is not a usable file name: letters, digits, "_", "-" and "." (not first), with "/" '
            "between folder names"
        )
    return rid


def _record(obj: dict, rid: str, n: int, where: str, base: Path, specs, defaults, limits: Limits) -> Record:
    unknown = [k for k in obj if k not in RECORD_FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, RECORD_FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise _Bad(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Bad('"prompt" must be a non-empty string' + ("" if "prompt" in obj else ", and is missing"))
    images = obj.get("input_images")
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise _Bad('"input_images" must be a list of paths (strings) or null')
    if len(images) > MAX_INPUT_IMAGES:
        raise _Bad(f"{len(images)} input images; OmniGen2 takes at most {MAX_INPUT_IMAGES}")
    settings = {k: obj[k] if k in obj else defaults[k] for k in SAMPLING_FIELDS}
    settings = _check_settings(settings, specs, limits)
    return Record(n, where, rid, prompt, tuple(images), tuple(base / p for p in images), settings)


def _check_settings(settings: dict, specs: dict[str, FieldSpec], limits: Limits) -> dict:
    out = {}
    for name, value in settings.items():
        out[name] = _check_value(name, value, specs[name])
    if out["seed"] is None:
        raise _Bad('"seed" must be an integer')
    lo, hi = SEED_RANGE
    if not lo <= out["seed"] < hi:
        raise _Bad(f'"seed" must be in [0, 2**64), got {out["seed"]}')
    if out["height"] is not None and out["width"] is not None and out["height"] * out["width"] > limits.output_pixels:
        raise _Bad(
            f"size {out['width']}x{out['height']} is above the limit of {limits.output_pixels} pixels "
            f"({FLAGS['output_pixels']})"
        )
    if out["steps"] is not None and out["steps"] > limits.steps:
        raise _Bad(f'"steps" {out["steps"]} is above the limit of {limits.steps} ({FLAGS["steps"]})')
    if out["max_sequence_length"] is not None and out["max_sequence_length"] > limits.prompt_tokens:
        raise _Bad(
            f'"max_sequence_length" {out["max_sequence_length"]} is above the limit of {limits.prompt_tokens} '
            f"({FLAGS['prompt_tokens']})"
        )
    a, b = out["cfg_range"]
    if not 0.0 <= a <= b <= 1.0:
        raise _Bad(f'"cfg_range" must satisfy 0 <= start <= end <= 1, got {[a, b]}')
    if out["teacache"] is not None and out["taylorseer"]:
        raise _Bad('"teacache" and "taylorseer" are alternatives; pick one')
    return out


def _check_value(name: str, value, spec: FieldSpec):
    if value is None:
        if spec.nullable:
            return None
        raise _Bad(f'"{name}" must not be null')
    kind = spec.kind
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind == "str":
        ok = isinstance(value, str)
    else:  # pair
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )
        value = [float(v) for v in value] if ok else value
    if not ok:
        want = {"pair": "a list of two numbers", "int": "an integer", "float": "a number", "str": "a string"}
        want["bool"] = "true or false"
        raise _Bad(f'"{name}" must be {want[kind]}{" or null" if spec.nullable else ""}, got {_json_type(value)}')
    if spec.choices is not None and value not in spec.choices:
        raise _Bad(f'"{name}" must be one of {", ".join(map(repr, spec.choices))}, got {value!r}')
    for v in value if kind == "pair" else [value]:
        problem = None if spec.rule is None or name == "seed" else spec.rule.problem(v)
        if problem:  # the flag's own range: "steps" >= 1, "text_guidance" >= 0, "cfg_range" in [0, 1], ...
            raise _Bad(f'"{name}" must be {problem}, got {v!r}')
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return "a list" if isinstance(value, list) else "an object"
