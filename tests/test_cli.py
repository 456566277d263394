"""The ``omnigen2`` command line on the official-tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from omnigen2.cli import main

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
