"""The OmniContext items: the published dataset's rows, from the hub, from its parquet files, or from a folder
holding ``data.jsonl`` and the images.

A row has ``key``, ``task_type`` (one of :data:`TASK_TYPES`), ``instruction``, ``instruction_language`` and
``input_images``. In the parquet files (the hub's layout, written by ``datasets``) an image is a struct
``{"bytes", "path"}``; those are written once under ``WORK/inputs/`` so that ``omnigen2 batch`` and the judge read
files. In ``data.jsonl`` an image is a path relative to the file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ... import jsonl
from . import HUB_ID, TASK_TYPES

_SAFE = re.compile(r"[\w\-][\w.\-]{0,100}")  # a key usable as one segment of a batch record id


@dataclass(frozen=True)
class Item:
    """One prompt of the benchmark; ``input_images`` are files (absolute paths)."""

    key: str
    task_type: str
    instruction: str
    language: str
    input_images: tuple[Path, ...]

    @property
    def name(self) -> str:
        """``task_type/key``, the key made a file name (a hash where it is not one)."""
        key = self.key if _SAFE.fullmatch(self.key) else "k" + hashlib.sha1(self.key.encode()).hexdigest()[:16]
        return f"{self.task_type}/{key}"


def load_items(data: str | os.PathLike, work: Path, language: str | None = "en") -> list[Item]:
    """The items of ``data`` (a ``data.jsonl`` folder, a parquet file, a folder of parquet files, or a hub id),
    kept to ``language`` (None: every language), sorted by task type then key."""
    path = Path(data)
    if path.is_dir() and (path / "data.jsonl").is_file():
        rows = _jsonl_rows(path / "data.jsonl")
    elif path.is_file() and path.suffix == ".parquet":
        rows = _parquet_rows([path], work)
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise ValueError(f"{path} holds neither data.jsonl nor parquet files")
        rows = _parquet_rows(files, work)
    elif path.exists():
        raise ValueError(f"{data}: not a data.jsonl folder, a parquet file or a folder of parquet files")
    elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(data)):
        rows = _parquet_rows(sorted(Path(_download(str(data))).rglob("*.parquet")), work)
    else:
        raise ValueError(f"{data} does not exist, and is not a hub dataset id such as {HUB_ID}")
    items = [_item(row, where) for row, where in rows]
    seen: dict[tuple[str, str], str] = {}
    for item, (_, where) in zip(items, rows):
        if (item.task_type, item.key) in seen:
            raise ValueError(
                f"{where}: key {item.key!r} of {item.task_type} is used already at {seen[item.task_type, item.key]}"
            )
        seen[item.task_type, item.key] = where
    kept = [it for it in items if language is None or it.language == language]
    if items and not kept:
        found = sorted({it.language for it in items})
        raise ValueError(f"no item of {data} is in language {language!r} (found: {', '.join(found)})")
    return sorted(kept, key=lambda it: (TASK_TYPES.index(it.task_type), it.key))


def _download(repo_id: str) -> str:
    """The parquet files of a hub dataset (e.g. ``OmniGen2/OmniContext``), through the hub's cache."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=["*.parquet"])


def _jsonl_rows(path: Path) -> list[tuple[dict, str]]:
    rows = []
    base = path.parent.resolve()
    for n, raw in jsonl.lines(path.read_bytes()):
        where = f"{path}:{n}"
        try:
            row = jsonl.decode_object(raw, "a row")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        images = row.get("input_images")
        if isinstance(images, list) and all(isinstance(p, str) for p in images):
            row = {**row, "input_images": [base / p for p in images]}
        rows.append((row, where))
    return rows


def _parquet_rows(files: list[Path], work: Path) -> list[tuple[dict, str]]:
    """Rows of parquet files, their embedded images written to ``work/inputs/TASK_TYPE/KEY_I.EXT``."""
    import pyarrow.parquet as pq

    rows = []
    for file in files:
        for n, row in enumerate(pq.read_table(file).to_pylist()):
            where = f"{file}:row {n}"
            images = row.get("input_images")
            if isinstance(images, list) and isinstance(row.get("key"), str) and row.get("task_type") in TASK_TYPES:
                name = Item(row["key"], row["task_type"], "", "", ()).name
                row = {
                    **row,
                    "input_images": [_write_image(im, work / "inputs", name, i, where) for i, im in enumerate(images)],
                }
            rows.append((row, where))
    return rows


def _write_image(image, folder: Path, name: str, i: int, where: str) -> Path:
    """An image struct of a parquet row as a file, written only when absent or different (every process of an
    accelerate job writes the same bytes; the rename is atomic)."""
    if not isinstance(image, dict) or not isinstance(image.get("bytes"), (bytes, bytearray)):
        raise ValueError(f"{where}: input image {i + 1} carries no bytes")
    data = bytes(image["bytes"])
    suffix = Path(image.get("path") or "").suffix.lower() or ".png"
    path = (folder / f"{name}_{i}").with_suffix(suffix if re.fullmatch(r"\.\w{1,5}", suffix) else ".png")
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path.resolve()


def _item(row: dict, where: str) -> Item:
    missing = [f for f in ("key", "task_type", "instruction", "input_images") if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    key, task, instruction = row["key"], row["task_type"], row["instruction"]
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: key must be a non-empty string")
    if task not in TASK_TYPES:
        raise ValueError(f"{where}: unknown task_type {task!r} (known: {', '.join(TASK_TYPES)})")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: instruction must be a non-empty string")
    images = row["input_images"]
    if not isinstance(images, list) or not images or len(images) > 5:
        raise ValueError(f"{where}: input_images must list 1 to 5 images")
    for p in images:
        if not Path(p).is_file():
            raise ValueError(f"{where}: input image {p} does not exist")
    language = row.get("instruction_language") or "en"
    return Item(key, task, instruction, str(language), tuple(Path(p) for p in images))
