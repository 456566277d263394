"""Shapes World training data, from training seeds only.

Layout written by :func:`write_dataset`::

    OUT/t2i/records.jsonl, OUT/edit/records.jsonl, OUT/ic/records.jsonl   # OmniGen2 records (training/data.py)
    OUT/mix.yml                                                           # the image tasks, with ratios
    OUT/understanding/records.jsonl, OUT/reflection/records.jsonl         # {image, question, answer}
    OUT/<task>/images/<category>_<seed>_{in0,in1,..,out}.png

Image paths in records are relative to their jsonl file, as the original format expects. Every record also
carries ``category`` and ``seed`` so a sample can be traced back to its case (the loader ignores them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .tasks import IMAGE_TASKS, TASKS, Case, cases

ALL_TASKS = tuple(TASKS)
DEFAULT_RATIOS = {"t2i": 1.0, "edit": 1.0, "ic": 1.0}


@dataclass
class DatasetSummary:
    root: Path
    mix: Path | None  # the yml mix of the image tasks (None when no image task was written)
    files: dict[str, Path] = field(default_factory=dict)  # task -> records.jsonl
    counts: dict[str, int] = field(default_factory=dict)  # task -> records


def _stem(case: Case) -> str:
    return f"{case.category.replace(' ', '_')}_{case.seed}"


def _save_inputs(case: Case, images_dir: Path) -> list[str]:
    paths = []
    for k, img in enumerate(case.input_images()):
        name = f"{_stem(case)}_in{k}.png"
        img.save(images_dir / name)
        paths.append(f"images/{name}")
    return paths


def image_record(case: Case, images_dir: Path) -> dict:
    """An OmniGen2 training record; the target is the case's canonical scene, rendered with jitter."""
    inputs = _save_inputs(case, images_dir)
    out = f"{_stem(case)}_out.png"
    case.render_target().save(images_dir / out)
    return {
        "task_type": case.task,
        "instruction": case.prompt,
        "input_images": inputs,
        "output_image": f"images/{out}",
        "category": case.category,
        "seed": case.seed,
    }


def text_record(case: Case, images_dir: Path) -> dict:
    """An understanding / reflection record: one image, a question and its exact answer."""
    (image,) = _save_inputs(case, images_dir)
    record = {"image": image, "question": case.prompt, "answer": case.answer}
    if case.instruction is not None:
        record["instruction"] = case.instruction
    return record | {"category": case.category, "seed": case.seed}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)  # a records file is complete or absent


def _write_records(args: tuple[str, list[Case], Path]) -> list[dict]:
    task, chunk, images_dir = args
    make = image_record if task in IMAGE_TASKS else text_record
    return [make(case, images_dir) for case in chunk]


def write_dataset(
    out_dir: str | os.PathLike,
    n_per_task: int,
    seed_offset: int = 0,
    tasks: tuple[str, ...] = ALL_TASKS,
    ratios: dict[str, float] | None = None,
    workers: int = 1,
) -> DatasetSummary:
    """Write ``n_per_task`` cases of each task (spread over its categories) from training seeds >= seed_offset.
    Calls with offsets far apart write disjoint data; evaluation seeds are never used. ``workers`` > 1 renders in
    that many processes (the records and images are the same, in the same order)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
    root = Path(out_dir)
    summary = DatasetSummary(root, None)
    for task in tasks:
        images_dir = root / task / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        todo = cases(task, n_per_task, split="train", start=seed_offset)
        size = max(1, -(-len(todo) // max(1, workers)))
        chunks = [(task, todo[i : i + size], images_dir) for i in range(0, len(todo), size)]
        if workers > 1 and len(chunks) > 1:
            from multiprocessing import get_context

            with get_context("spawn").Pool(min(workers, len(chunks))) as pool:
                records = [r for part in pool.map(_write_records, chunks) for r in part]
        else:
            records = [r for chunk in chunks for r in _write_records(chunk)]
        path = root / task / "records.jsonl"
        _write_jsonl(path, records)
        summary.files[task], summary.counts[task] = path, len(records)
    image_tasks = [t for t in tasks if t in IMAGE_TASKS]
    if image_tasks:
        ratios = {**DEFAULT_RATIOS, **(ratios or {})}
        mix = {"data": [{"path": f"{t}/records.jsonl", "ratio": float(ratios[t])} for t in image_tasks]}
        summary.mix = root / "mix.yml"
        summary.mix.write_text(yaml.safe_dump(mix, sort_keys=False))
    return summary
