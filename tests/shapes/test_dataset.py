"""The dataset writer: records in the original OmniGen2 format that the training loader accepts, from
training seeds only; understanding records with exact answers."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer

from omnigen2.shapes import judge
from omnigen2.shapes.dataset import write_dataset
from omnigen2.shapes.tasks import answer, split_of
from omnigen2.training.data import DataConfig, MixtureDataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), n_per_task=8, seed_offset=100)


def test_training_loader_accepts_every_record(dataset, official_tiny):
    tokenizer = AutoTokenizer.from_pretrained(official_tiny / "checkpoint" / "processor")
    data = MixtureDataset(DataConfig(path=str(dataset.mix), max_output_pixels=64 * 64), tokenizer)
    assert data.bad == [] and len(data) == 3 * 8
    assert yaml.safe_load(dataset.mix.read_text())["data"][0] == {"path": "t2i/records.jsonl", "ratio": 1.0}
    batch = data.batch(0, range(4))
    assert all(t.shape == (3, 64, 64) for t in batch["targets"])
    assert {len(r) for r in batch["refs"]} <= {0, 1, 2, 3}


def test_records_come_from_training_seeds_and_match_their_images(dataset):
    for task in ("t2i", "edit", "ic"):
        records = [json.loads(line) for line in dataset.files[task].read_text().splitlines()]
        assert len(records) == 8 and {r["task_type"] for r in records} == {task}
        for r in records:
            assert split_of(r["seed"]) == "train" and r["seed"] >= 100
            assert not r["output_image"].startswith("/")
            out = judge.read(dataset.files[task].parent / r["output_image"])
            assert not isinstance(out, judge.Failure)
        assert sum(bool(r["input_images"]) for r in records) == (0 if task == "t2i" else 8)


def test_understanding_records_have_exact_answers(dataset):
    records = [json.loads(line) for line in dataset.files["understanding"].read_text().splitlines()]
    assert len(records) == 8 and {"image", "question", "answer"} <= set(records[0])
    for r in records:
        scene = judge.read(dataset.files["understanding"].parent / r["image"])
        assert answer(r["question"], scene) == r["answer"]
    reflections = [json.loads(line) for line in dataset.files["reflection"].read_text().splitlines()]
    assert all(r["answer"].startswith("the image") and r["instruction"] in r["question"] for r in reflections)


def test_unknown_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        write_dataset(tmp_path, 1, tasks=("t2v",))


def test_parallel_writing_gives_the_same_data(tmp_path):
    one = write_dataset(tmp_path / "one", 6, tasks=("edit", "understanding"))
    two = write_dataset(tmp_path / "two", 6, tasks=("edit", "understanding"), workers=2)
    for task in ("edit", "understanding"):
        assert one.files[task].read_text() == two.files[task].read_text()
        for png in (tmp_path / "one" / task / "images").iterdir():
            assert png.read_bytes() == (tmp_path / "two" / task / "images" / png.name).read_bytes()
