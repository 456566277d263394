"""``generate -o``: overwrite refusal, folders, extensions, unwritable locations and failed writes, each ending in
success or one line with exit code 2 before the model loads, and never leaving a temporary file behind."""

from __future__ import annotations

import json
import os
import warnings

import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omnigen2.cli as cli
from omnigen2.cli import main

SMALL = ["--steps", "1", "--height", "32", "--width", "32", "--device", "cpu"]


@pytest.fixture
def model(official_tiny):
    return ["--model", str(official_tiny / "checkpoint")]


@pytest.fixture
def no_model(monkeypatch):
    """Fails a test whose command gets as far as loading the model."""
    from omnigen2 import OmniGen2Pipeline

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(OmniGen2Pipeline, "from_pretrained", refuse)


def run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(argv)
    err = capsys.readouterr().err
    if rc != 0:  # one line, the last (progress bars of the model loading may come before it)
        lines = [line for line in err.splitlines() if "omnigen2: error" in line]
        assert rc == 2 and len(lines) == 1 and err.endswith(lines[0] + "\n") and lines[0].startswith("omnigen2: "), err
    return rc, err


def tmp_files(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".omnigen2-probe-" in p.name]


def test_existing_file_refused_before_loading(tmp_path, capsys, model, no_model):
    out = tmp_path / "a.png"
    out.write_bytes(b"mine")
    rc, err = run(["generate", "x", *model, *SMALL, "-o", str(out)], capsys)
    assert rc == 2 and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("existing", ["many_1.png", "many_grid.png"])
def test_every_file_of_several_images_checked(tmp_path, capsys, model, no_model, existing):
    (tmp_path / existing).write_bytes(b"mine")
    rc, err = run(["generate", "x", *model, *SMALL, "--num-images", "2", "-o", str(tmp_path / "many.png")], capsys)
    assert rc == 2 and existing in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_overwrite_replaces(tmp_path, capsys, model):
    out = tmp_path / "a.png"
    out.write_bytes(b"mine")
    assert run(["generate", "x", *model, *SMALL, "-o", str(out), "--overwrite"], capsys)[0] == 0
    assert PIL.Image.open(out).size == (32, 32)
    assert not tmp_files(tmp_path)


def test_directory_means_inside_it(tmp_path, capsys, model):
    folder = tmp_path / "out"
    folder.mkdir()
    assert run(["generate", "x", *model, *SMALL, "-o", str(folder)], capsys)[0] == 0
    assert [p.name for p in folder.iterdir()] == ["omnigen2.png"]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(("name", "fmt"), [("a.png", "PNG"), ("a.jpg", "JPEG"), ("a.JPEG", "JPEG"), ("a.webp", "WEBP")])
def test_extension_picks_the_format_and_keeps_the_settings(tmp_path, capsys, model, name, fmt):
    out = tmp_path / name
    assert run(["generate", "a cat", *model, *SMALL, "-o", str(out), "--seed", "5"], capsys)[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == [name]  # not swapped to .png
    with PIL.Image.open(out) as img:
        assert img.format == fmt
        text = img.text["parameters"] if fmt == "PNG" else img.getexif()[0x010E]
    params = json.loads(text)
    assert params["prompt"] == "a cat" and params["seed"] == 5


def test_no_extension_means_png(tmp_path, capsys, model):
    assert run(["generate", "x", *model, *SMALL, "-o", str(tmp_path / "plain")], capsys)[0] == 0
    assert PIL.Image.open(tmp_path / "plain.png").format == "PNG"


@pytest.mark.parametrize("name", ["a.gif", "a.txt", "a.png.bak", "a.tiff"])
def test_unknown_extension_refused(tmp_path, capsys, model, no_model, name):
    rc, err = run(["generate", "x", *model, *SMALL, "-o", str(tmp_path / name)], capsys)
    assert rc == 2 and "unknown image extension" in err and ".png, .jpg, .jpeg, .webp" in err
    assert not list(tmp_path.iterdir())


def test_parent_is_a_file_refused_before_loading(tmp_path, capsys, model, no_model):
    (tmp_path / "file").write_bytes(b"x")
    rc, err = run(["generate", "x", *model, *SMALL, "-o", str(tmp_path / "file" / "sub" / "a.png")], capsys)
    assert rc == 2 and "is a file, not a folder" in err


def test_unwritable_folder_refused_before_loading(tmp_path, capsys, model, no_model, monkeypatch):
    """A folder that refuses new files (read-only mount, no permission; injected: the tests may run as root)."""

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", denied)
    rc, err = run(["generate", "x", *model, *SMALL, "-o", str(tmp_path / "a.png")], capsys)
    assert rc == 2 and "cannot write into" in err and "Permission denied" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fail_at", ["save", "replace"])
def test_failed_write_leaves_no_tmp_file(tmp_path, capsys, model, monkeypatch, fail_at):
    """A disk that fills mid-write (or a failing rename): one line, exit 2, no output and no PATH.tmp."""
    real_save = PIL.Image.Image.save

    def partial_save(self, fp, *a, **k):
        real_save(self, fp, *a, **k)  # the bytes reach the temporary file, then the disk is full
        raise OSError(28, "No space left on device")

    def failing_replace(src, dst):
        raise OSError(5, "Input/output error")

    if fail_at == "save":
        monkeypatch.setattr(PIL.Image.Image, "save", partial_save)
    else:
        monkeypatch.setattr(cli.os, "replace", failing_replace)
    rc, err = run(["generate", "x", *model, *SMALL, "-o", str(tmp_path / "a.png")], capsys)
    assert rc == 2 and ("No space left" in err or "Input/output error" in err) and "a.png" in err
    assert not list(tmp_path.iterdir())


@settings(max_examples=20)
@given(
    target=st.sampled_from(["a.png", "a.jpg", "a.webp", "a", "a.gif", "dir", "dir/", "new/sub/a.png", "file/a.png"]),
    count=st.integers(1, 2),
    pre=st.sets(st.sampled_from(["a.png", "a_0.png", "a_grid.jpg", "dir/omnigen2.png", "a.jpg"]), max_size=2),
    overwrite=st.booleans(),
)
def test_random_outputs(official_tiny, tmp_path_factory, capsys, target, count, pre, overwrite):
    """Any -o, image count and set of existing files: success with exactly the expected new files, or one line
    and exit 2 with nothing changed; never a temporary file."""
    root = tmp_path_factory.mktemp("out")
    (root / "dir").mkdir()
    (root / "file").write_bytes(b"x")
    for name in pre:
        (root / name).write_bytes(b"old")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    argv = ["generate", "x", "--model", str(official_tiny / "checkpoint"), *SMALL, "--num-images", str(count)]
    argv += ["-o", str(root / target) + ("/" if target.endswith("/") else "")]
    rc, _ = run(argv + (["--overwrite"] if overwrite else []), capsys)
    assert not tmp_files(root)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    if rc == 2:
        assert after == before
        return
    expected = cli.output_paths(str(root / target) + ("/" if target.endswith("/") else ""), count)
    assert set(after) == set(before) | set(expected)
    for p in expected:
        assert PIL.Image.open(p).format == cli.OUTPUT_FORMATS[p.suffix.lower()]
    if not overwrite:
        assert all(after[p] == before[p] for p in before)


def test_chat_refuses_existing_output_before_loading(tmp_path, capsys, model, no_model, monkeypatch):
    from omnigen2 import OmniGen2ChatPipeline

    monkeypatch.setattr(OmniGen2ChatPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "c_round1.png").write_bytes(b"mine")
    rc, err = run(["chat", "x", *model, "--reflect", "2", "-o", str(tmp_path / "c")], capsys)
    assert rc == 2 and "c_round1.png" in err and "--overwrite" in err


def test_tmp_name_is_the_one_batch_cleans(tmp_path, monkeypatch):
    """``omnigen2 batch`` removes ID.png.tmp after a killed run: the helper writes exactly that name."""
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(cli.os, "replace", lambda src, dst: (seen.append(src), real_replace(src, dst)))
    cli.save_image(PIL.Image.new("RGB", (4, 4)), tmp_path / "r.png", {"k": 1})
    assert [os.path.basename(s) for s in seen] == ["r.png.tmp"] and not tmp_files(tmp_path)
