"""Parsing and checking ``omnigen2 batch`` records (no model, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from omnigen2.batch.cli import _generate_parser
from omnigen2.batch.records import SAMPLING_FIELDS, Record, check_defaults, field_specs, parse_records

SPECS = field_specs(_generate_parser())
DEFAULTS = {name: SPECS[name].default for name in SAMPLING_FIELDS}


def parse(tmp_path, *lines: str | dict, raw: bytes | None = None):
    path = tmp_path / "r.jsonl"
    if raw is None:
        raw = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines).encode()
    path.write_bytes(raw)
    return parse_records(path, SPECS, DEFAULTS)


def test_specs_follow_the_generate_flags():
    kinds = {name: spec.kind for name, spec in SPECS.items()}
    assert kinds["seed"] == kinds["steps"] == kinds["height"] == "int"
    assert kinds["text_guidance"] == kinds["teacache"] == "float"
    assert kinds["cfg_range"] == "pair" and kinds["taylorseer"] == "bool" and kinds["negative_prompt"] == "str"
    assert SPECS["scheduler"].choices == ("euler", "dpmsolver++")
    assert DEFAULTS["seed"] == 0 and DEFAULTS["steps"] is None and DEFAULTS["cfg_range"] == [0.0, 1.0]


def test_records_take_the_defaults_and_resolve_images(tmp_path):
    records, errors = parse(
        tmp_path,
        {"id": "a", "prompt": "p", "seed": 3, "text_guidance": 5},
        "",
        {"id": 7, "prompt": "q\u2028r", "input_images": ["x/1.png"], "cfg_range": [0, 0.5]},
    )
    assert errors == []
    a, b = records
    assert (a.n, a.where, a.file) == (1, f"{tmp_path / 'r.jsonl'}:1", "a.png")
    assert a.settings["seed"] == 3 and a.settings["text_guidance"] == 5.0 and a.settings["steps"] is None
    assert b.n == 3 and b.id == "7" and b.prompt == "q\u2028r"  # U+2028 does not end a JSON Lines record
    assert b.input_images == ("x/1.png",) and b.image_paths == (tmp_path / "x" / "1.png",)
    assert b.settings["cfg_range"] == [0.0, 0.5] and b.settings["seed"] == 0
    assert Record.from_json(b.to_json()) == b


def test_crlf_and_bom(tmp_path):
    raw = b'\xef\xbb\xbf{"id": "a", "prompt": "p"}\r\n{"id": "b", "prompt": "p"}\r\n'
    records, errors = parse(tmp_path, raw=raw)
    assert [r.id for r in records] == ["a", "b"] and errors == []


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"id": "a", "prompt": "p", "stpes": 4}, "unknown field 'stpes' (did you mean 'steps'?)"),
        ({"id": "a", "prompt": "p", "steps": True}, '"steps" must be an integer or null, got a boolean'),
        ({"id": "a", "prompt": "p", "seed": "1"}, "\"seed\" must be an integer, got the string '1'"),
        ({"id": "a", "prompt": "p", "height": 64.0}, '"height" must be an integer or null, got the number 64.0'),
        ({"id": "a", "prompt": "p", "width": 0}, '"width" must be >= 1, got 0'),
        ({"id": "a", "prompt": "p", "height": 9000, "width": 9000}, "size 9000x9000 is above the limit"),
        ({"id": "a", "prompt": "p", "steps": 0}, '"steps" must be >= 1, got 0'),
        ({"id": "a", "prompt": "p", "seed": -1}, '"seed" must be in [0, 2**64)'),
        ({"id": "a", "prompt": "p", "input_images": ["1"] * 6}, "6 input images; OmniGen2 takes at most 5"),
        ({"id": "a", "prompt": "p", "input_images": "x.png"}, '"input_images" must be a list'),
        ({"id": "a", "prompt": "p", "scheduler": "ddim"}, "\"scheduler\" must be one of 'euler', 'dpmsolver++'"),
        ({"id": "a", "prompt": "p", "cfg_range": [0.5, 0.2]}, "0 <= start <= end <= 1"),
        ({"id": "a", "prompt": "p", "teacache": 0.05, "taylorseer": True}, "alternatives"),
        ({"id": "a"}, '"prompt" must be a non-empty string, and is missing'),
        ({"prompt": "p"}, 'missing "id"'),
        ({"id": "../up", "prompt": "p"}, "not a usable file name"),
        ({"id": ".hidden", "prompt": "p"}, "not a usable file name"),
        ("[1, 2]", "a record must be a JSON object, got list"),
        ('{"id": "a", "prompt": ', "not JSON"),
    ],
)
def test_bad_records_name_the_line(tmp_path, record, reason):
    good = {"id": "ok", "prompt": "fine"}
    records, errors = parse(tmp_path, good, record, {**good, "id": "ok2"})
    assert [r.id for r in records] == ["ok", "ok2"]
    (err,) = errors
    assert err.n == 2 and err.message.startswith(f"{tmp_path / 'r.jsonl'}:2: ")
    assert reason in err.reason, err.reason


def test_duplicate_ids_and_undecodable_lines(tmp_path):
    raw = b'{"id": "a", "prompt": "p"}\n{"id": "a", "prompt": "q"}\n{"id": "b", "prompt": "\xff"}\n'
    records, errors = parse(tmp_path, raw=raw)
    assert [r.id for r in records] == ["a"]
    assert [(e.n, e.id) for e in errors] == [(2, "a"), (3, None)]
    assert "used already on line 1" in errors[0].reason and "not UTF-8" in errors[1].reason


def test_command_line_defaults_are_checked():
    check_defaults(SPECS, DEFAULTS)
    with pytest.raises(ValueError, match='command line: "steps" must be >= 1'):
        check_defaults(SPECS, {**DEFAULTS, "steps": 0})


def test_records_beyond_a_limit_are_refused_unless_the_flag_raises_it(tmp_path):
    from omnigen2.limits import Limits

    big = Limits().steps + 50
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "steps": big, "height": 4096, "width": 8192}) + "\n")
    records, errors = parse_records(path, SPECS, DEFAULTS)
    assert not records and "is above the limit of" in errors[0].reason and "--limit-output-pixels" in errors[0].reason
    raised = Limits(output_pixels=4096 * 8192)
    records, errors = parse_records(path, SPECS, DEFAULTS, raised)
    assert (
        not records
        and f'"steps" {big} is above the limit of' in errors[0].reason
        and "--limit-steps" in errors[0].reason
    )
    records, errors = parse_records(path, SPECS, DEFAULTS, Limits(output_pixels=4096 * 8192, steps=big))
    assert not errors and records[0].settings["steps"] == big
    args = _generate_parser()  # batch declares generate's bounds that apply to a record
    from omnigen2.cli import build_parser

    batch = build_parser().parse_args(["batch", "r.jsonl", "-o", "out", "--limit-steps", str(big)])
    assert batch.limit_steps == big and args.parse_args(["p"]).limit_steps == Limits().steps


def test_batch_help_is_light_and_shows_defaults():
    code = (
        "import sys, contextlib, io\n"
        "import omnigen2.cli as cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(buf):\n"
        "    cli.main(['batch', '--help'])\n"
        "print([m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules])\n"
        "print(buf.getvalue())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded, help_text = r.stdout.split("\n", 1)
    assert loaded == "[]", r.stdout + r.stderr
    flat = " ".join(help_text.split())
    for flag in ("--steps", "--seed", "--cfg-range", "--engine", "--actors", "--batch-size", "--ray-address"):
        assert flag in flat
    assert "(default: 0)" in flat and "(default: accelerate)" in flat
