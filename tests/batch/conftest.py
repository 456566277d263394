"""Fixtures of the ``omnigen2 batch`` tests: a records file with good and bad records, and one run of it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

# Every run that compares files uses one CPU thread: a different thread count may change float rounding in the
# reference-image path (accelerate launch and Ray actors set one thread per process themselves).
SAMPLING = ["--steps", "2", "--height", "64", "--width", "64"]
GOOD = ["t2i", "edit", "ic/two", "dpm", "sep"]


@contextmanager
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_records(folder: Path) -> Path:
    """records.jsonl with 5 good records (text-to-image, editing, in-context, another sampler and size, a prompt
    holding U+2028) and 5 bad ones, on lines 2, 5, 6, 7, 10."""
    (folder / "imgs").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "imgs" / "red.png")
    Image.new("RGB", (48, 64), (30, 30, 200)).save(folder / "imgs" / "blue.png")
    (folder / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        {"id": "t2i", "prompt": "A red circle in the park.", "seed": 1},
        {"id": "typo", "prompt": "A cat.", "sed": 4},
        {"id": "edit", "prompt": "Make it blue.", "input_images": ["imgs/red.png"], "seed": 2},
        {
            "id": "ic/two",
            "prompt": "Both together.",
            "input_images": ["imgs/red.png", "imgs/blue.png"],
            "seed": 3,
            "image_guidance": 2.0,
        },
        {"id": "missing", "prompt": "A dog.", "input_images": ["imgs/nowhere.png"]},
        {"id": "corrupt", "prompt": "A dog.", "input_images": ["imgs/corrupt.png"]},
        {"id": "flat", "prompt": "A dog.", "height": 0},
        {"id": "dpm", "prompt": "A cat.", "seed": 7, "steps": 3, "height": 32, "scheduler": "dpmsolver++"},
        {"id": "sep", "prompt": "A line\u2028separator inside.", "seed": 5, "cfg_range": [0.0, 0.5]},
        {"id": "steps", "prompt": "A cat.", "steps": "3"},
    ]
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


def read_manifest(path: Path, comparable: bool = False) -> list[dict]:
    """The manifest's lines; ``comparable`` drops what differs between runs (seconds, process, timing)."""
    lines = [json.loads(s) for s in path.read_text(encoding="utf-8").split("\n") if s]
    if comparable:
        for line in lines:
            line.pop("seconds", None)
            line.pop("process", None)
            for key in ("seconds", "images_per_second", "processes", "engine"):
                line.get("summary", {}).pop(key, None)
    return lines


@pytest.fixture(scope="module")
def job(tmp_path_factory, official_tiny):
    """One single-process run of records.jsonl (in this process, one thread): (records, out, exit status)."""
    from omnigen2.cli import main

    folder = tmp_path_factory.mktemp("batch")
    records = write_records(folder)
    out = folder / "out"
    model = str(official_tiny / "checkpoint")
    with one_thread():
        rc = main(["batch", str(records), "-o", str(out), "--model", model, *SAMPLING])
    return records, out, rc, model
