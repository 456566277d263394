"""The ``omnigen2`` command line on the official-tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from omnigen2.cli import build_parser, main

BASE = ["--height", "64", "--width", "64", "--steps", "2"]


def test_generate_writes_png_with_parameters(official_tiny, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(
        [
            "generate",
            "A red circle in the park.",
            "--model",
            str(official_tiny / "checkpoint"),
            "-o",
            str(out),
            "--seed",
            "3",
            *BASE,
        ]
    )
    assert rc == 0
    img = Image.open(out)
    assert img.size == (64, 64)
    params = json.loads(img.text["parameters"])
    assert params["prompt"] == "A red circle in the park." and params["seed"] == 3 and params["steps"] == 2
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_image(official_tiny, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        assert main(["generate", "A cat.", "--model", str(official_tiny / "checkpoint"), "-o", str(p), *BASE]) == 0
    assert Image.open(paths[0]).tobytes() == Image.open(paths[1]).tobytes()


def test_several_images_and_grid(official_tiny, tmp_path):
    out = tmp_path / "many.png"
    rc = main(
        [
            "generate",
            "A cat.",
            "--model",
            str(official_tiny / "checkpoint"),
            "-o",
            str(out),
            "--num-images",
            "3",
            "--scheduler",
            "dpmsolver++",
            "--teacache",
            *BASE,
        ]
    )
    assert rc == 0
    for k in range(3):
        assert Image.open(tmp_path / f"many_{k}.png").size == (64, 64)
    assert Image.open(tmp_path / "many_grid.png").size == (128, 128)  # 2x2 grid


def test_editing_and_in_context(official_tiny, tmp_path):
    cases = official_tiny / "cases"
    out = tmp_path / "edit.png"
    rc = main(
        [
            "generate",
            "Make the circle yellow.",
            "-i",
            str(cases / "in_b.png"),
            "--model",
            str(official_tiny / "checkpoint"),
            "-o",
            str(out),
            "--steps",
            "2",
            "--image-guidance",
            "2",
        ]
    )
    assert rc == 0 and Image.open(out).size == Image.open(cases / "in_b.png").size
    out2 = tmp_path / "ic.png"
    rc = main(
        [
            "generate",
            "Put them together.",
            "-i",
            str(cases / "in_a.png"),
            "-i",
            str(cases / "in_c.png"),
            "--model",
            str(official_tiny / "checkpoint"),
            "-o",
            str(out2),
            "--taylorseer",
            *BASE,
        ]
    )
    assert rc == 0 and Image.open(out2).size == (64, 64)


def test_errors_are_reported(official_tiny, tmp_path, capsys):
    model = ["--model", str(official_tiny / "checkpoint")]
    assert main(["generate", "x", "-i", str(tmp_path / "missing.png"), *model]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "x", "--dtype", "fp8x", *model]) == 2
    assert "unknown dtype" in capsys.readouterr().err
    assert main(["generate", "x", "--device", "tpu", *model]) == 2
    assert "device" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert main(["generate", "x", "--teacache", "--taylorseer", *model]) == 2


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "omnigen2.cli", "--help"], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "generate" in r.stdout


HEAVY = ("torch", "diffusers", "transformers", "omnigen2.pipelines", "omnigen2.models")


def test_cli_import_and_help_stay_light():
    """`import omnigen2.cli` and every --help load none of the heavy modules: torch, diffusers and
    transformers wait for a command that needs them."""
    code = (
        "import sys, contextlib, io\n"
        "import omnigen2.cli as cli\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "for cmd in ([], ['generate'], ['chat'], ['bench'], ['train'], ['export'], ['eval', 'shapes']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main([*cmd, '--help'])\n"
        "print(loaded, [m for m in heavy if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[] []", r.stdout + r.stderr


def test_public_names_load_on_first_use():
    """The package's public names (loaded on first use, see the test above) are the classes of their modules."""
    import omnigen2
    from omnigen2.models.transformer_omnigen2 import OmniGen2Transformer2DModel
    from omnigen2.pipelines.pipeline_chat import ChatOutput, OmniGen2ChatPipeline
    from omnigen2.pipelines.pipeline_omnigen2 import OmniGen2Pipeline, OmniGen2PipelineOutput

    classes = [ChatOutput, OmniGen2ChatPipeline, OmniGen2Pipeline, OmniGen2PipelineOutput, OmniGen2Transformer2DModel]
    assert [getattr(omnigen2, c.__name__) for c in classes] == classes
    namespace: dict = {}
    exec("from omnigen2 import *", namespace)
    assert [namespace[c.__name__] for c in classes] == classes and namespace["__version__"] == omnigen2.__version__
    with pytest.raises(AttributeError, match="no attribute 'OmniGen3'"):
        omnigen2.OmniGen3  # noqa: B018


def _subparser(*cmd) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in cmd:  # walk down to the subcommand's parser
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _help_entries(*cmd) -> dict[str, str]:
    """Each option's entry in the printed help, on one line, keyed by its last flag."""
    options = _subparser(*cmd).format_help().split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", "\n" + options)[1:]  # an entry starts at a line "  -x ..., --flag ..."
    return {re.findall(r"--?[\w-]+", e.split("  ", 2)[1])[-1]: " ".join(e.split()) for e in entries}


@pytest.mark.parametrize("cmd", [("generate",), ("chat",), ("bench",), ("train",), ("export",), ("eval", "shapes")])
def test_help_shows_every_default(cmd):
    """Every option that is not a switch or required says its default."""
    entries = _help_entries(*cmd)
    for action in _subparser(*cmd)._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # positionals, switches (--flag, -h), required options
        assert "default" in entries[action.option_strings[-1]], (cmd, entries[action.option_strings[-1]])


ALL_COMMANDS = [
    ("generate",), ("chat",), ("bench",), ("train",), ("export",), ("eval", "shapes"), ("eval", "omnicontext"),
    ("batch",), ("serve",), ("app",),
]  # fmt: skip


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_every_numeric_option_has_a_checked_range(cmd):
    """No option parses with bare int or float (which take nan, inf and negatives): each number goes through
    omnigen2.cli.Number, which refuses what the option cannot mean, as one argparse error line."""
    from omnigen2.cli import Number

    for action in _subparser(*cmd)._actions:
        assert action.type not in (int, float), (cmd, action.option_strings)
        if isinstance(action.type, Number):
            for bad in ("nan", "inf", "-inf", "x"):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(bad)


def test_help_names_the_output_defaults():
    assert _help_entries("generate")["--output"].endswith("(default: omnigen2.png)")
    assert _help_entries("eval", "shapes")["--out"].endswith("(default: shapesbench)")
