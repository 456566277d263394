"""A four-sample dataset (two text-to-image, one edit, one in-context) and a config for the tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageDraw

COLORS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 200, 20)]


def draw(path, color, shape="ellipse", size=(64, 64)):
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    getattr(d, shape)([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=color)
    im.save(path)


@pytest.fixture(scope="session")
def four_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    for i, c in enumerate(COLORS):
        draw(root / "img" / f"{i}.png", c, "ellipse" if i % 2 == 0 else "rectangle")
    records = [
        {"task_type": "t2i", "instruction": "The image shows a red circle.", "output_image": "img/0.png"},
        {"task_type": "t2i", "instruction": "A blue square.", "input_images": None, "output_image": "img/1.png"},
        {
            "task_type": "edit",
            "instruction": "Make it green.",
            "input_images": ["img/0.png"],
            "output_image": "img/2.png",
        },
        {
            "task_type": "ic",
            "instruction": "Combine them.",
            "input_images": ["img/1.png", "img/2.png"],
            "output_image": "img/3.png",
        },
    ]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


@pytest.fixture
def base_config(four_samples, official_tiny, tmp_path):
    def make(**sections):
        cfg = {
            "model": {"pretrained": str(official_tiny / "checkpoint")},
            "data": {
                "path": str(four_samples / "data.jsonl"),
                "max_input_pixels": 4096,
                "max_output_pixels": 4096,
                "caption_prefix_drop": 0.0,
            },
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-3},
            "output": {"dir": str(tmp_path / "run"), "save_every": 2, "log_every": 1},
        }
        for k, v in sections.items():
            cfg.setdefault(k, {}).update(v)
        return cfg

    return make
