"""Training data in the original OmniGen2 format.

A **record** is one jsonl line::

    {"task_type": "t2i" | "edit" | "ic" (or longer names containing them),
     "instruction": "...", "input_images": ["a.png", ...] | null, "output_image": "out.png"}

with image paths relative to the jsonl file (absolute paths also work). A **mix** is a yml file::

    data:
      - {path: t2i/records.jsonl, ratio: 2}
      - {path: edit/, ratio: 1}          # a folder: every *.jsonl / *.json below it
      - {path: more/mix.yml, ratio: 1}   # a nested mix; its own ratios split its share

Ratios are honoured by weighted sampling: each draw picks a source with probability ratio / total, then a
record of that source uniformly (the original computes resampled index lists and then drops them, so its
ratios have no effect). Records are validated when the data is indexed; bad ones are reported with
``file:line`` and the reason, counted, and left out — never silently replaced by another sample.

Sampling is a pure function of (seed, step, position): the same run, resumed or split over processes, sees
the same samples with the same dropout decisions.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml

from ..images import ImageError, load_image
from ..models.transformer_omnigen2 import MAX_REF_IMAGES
from ..pipelines.image_processor import OmniGen2ImageProcessor
from ..pipelines.pipeline_omnigen2 import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

# Caption openings that the original strips from half of the text-to-image instructions, so the model does
# not learn to depend on captioner boilerplate.
CAPTION_PREFIXES = (
    "The image portrays ", "The image depicts ", "The image captures ", "The image highlights ",
    "The image shows ", "这张图片展示了",
)  # fmt: skip
TASK_TYPES = ("t2i", "text_to_image", "edit", "ic", "in_context")


class DataError(ValueError):
    """The data configuration or a record is unusable; the message names the file (and line)."""


@dataclass
class Record:
    task_type: str
    instruction: str
    input_images: list[str]
    output_image: str
    where: str  # "file:line", for error messages

    @property
    def is_t2i(self) -> bool:
        return "t2i" in self.task_type or "text_to_image" in self.task_type


@dataclass
class Source:
    """One weighted source of records (a jsonl file, a folder of them, or a nested mix)."""

    name: str
    ratio: float
    records: list[Record] = field(default_factory=list)
    children: list[Source] = field(default_factory=list)

    def flat(self, weight: float = 1.0) -> list[tuple[float, list[Record], str]]:
        """Leaves with their share of the total weight."""
        if self.records or not self.children:
            return [(weight, self.records, self.name)]
        total = sum(c.ratio for c in self.children)
        return [leaf for c in self.children for leaf in c.flat(weight * c.ratio / total)]


@dataclass(frozen=True)
class ImageSpec:
    """An image of a sample, resized lazily: decoding is skipped when its latents are cached."""

    path: str
    max_pixels: int
    max_side_length: int | None
    size_multiple: int
    where: str

    @property
    def cache_key(self) -> tuple[str, int, int | None]:
        """What decides the resized image, hence its VAE posterior (training/latent_cache.py)."""
        return self.path, self.max_pixels, self.max_side_length

    def load(self) -> torch.Tensor:
        """(3, H, W) in [-1, 1], resized by the original's rules."""
        try:
            img = load_image(self.path)
        except ImageError as e:
            raise DataError(f"{self.where}: {e}") from e
        proc = OmniGen2ImageProcessor(vae_scale_factor=self.size_multiple)
        return proc.preprocess_reference(img, self.max_pixels, self.max_side_length)[0]

    def pil(self) -> PIL.Image.Image:
        """The image as a user would hand it to the chat pipeline: the file, not resized."""
        try:
            return load_image(self.path)
        except ImageError as e:
            raise DataError(f"{self.where}: {e}") from e

    def size(self) -> tuple[int, int]:
        """The (H, W) that ``load`` returns, read from the file header only."""
        try:
            with PIL.Image.open(self.path) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{self.where}: image {self.path!r} cannot be read ({e})") from e
        proc = OmniGen2ImageProcessor(vae_scale_factor=self.size_multiple)
        return proc.target_size(h, w, self.max_pixels, self.max_side_length)


@dataclass
class BadRecord:
    where: str
    reason: str


def _check_image_file(path: str, check: bool) -> str | None:
    if not os.path.isfile(path):
        return f"image {path!r} does not exist"
    if check:
        try:
            with PIL.Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - any failure makes the record unusable
            return f"image {path!r} is not a readable image ({type(e).__name__}: {e})"
    return None


def parse_record(obj, base: Path, where: str, check_images: bool) -> Record | BadRecord:
    if not isinstance(obj, dict):
        return BadRecord(where, f"a record must be a JSON object, got {type(obj).__name__}")
    for key in ("task_type", "instruction", "output_image"):
        if key not in obj:
            return BadRecord(where, f"missing field {key!r}")
    task, instruction = obj["task_type"], obj["instruction"]
    if not isinstance(task, str) or not any(t in task for t in TASK_TYPES):
        return BadRecord(where, f"unknown task_type {task!r} (expected t2i, edit or ic)")
    if not isinstance(instruction, str) or not instruction.strip():
        return BadRecord(where, "empty instruction")
    inputs = obj.get("input_images") or []
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        return BadRecord(where, "input_images must be a list of paths")
    if len(inputs) > MAX_REF_IMAGES:
        return BadRecord(where, f"{len(inputs)} input images; at most {MAX_REF_IMAGES} are supported")
    if not isinstance(obj["output_image"], str):
        return BadRecord(where, "output_image must be a path")
    resolve = lambda p: str(p if os.path.isabs(p) else (base / p))  # noqa: E731
    inputs, output = [resolve(p) for p in inputs], resolve(obj["output_image"])
    for p in [*inputs, output]:
        problem = _check_image_file(p, check_images)
        if problem:
            return BadRecord(where, problem)
    return Record(task, instruction, inputs, output, where)


def read_jsonl(path: Path, check_images: bool, bad: list[BadRecord]) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = [(i + 1, obj) for i, obj in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadRecord(f"{path}:{lineno}", f"invalid JSON ({e.msg})"))
    for lineno, obj in items:
        rec = parse_record(obj, path.parent, f"{path}:{lineno}", check_images)
        (bad if isinstance(rec, BadRecord) else records).append(rec)
    return records


def load_source(
    path: str | os.PathLike,
    ratio: float = 1.0,
    check_images: bool = True,
    bad: list[BadRecord] | None = None,
    _seen: tuple = (),
) -> Source:
    """Index a jsonl file, a folder of jsonl files or a yml mix (recursively)."""
    bad = bad if bad is not None else []
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        files = sorted(glob.glob(str(p / "**" / "*.jsonl"), recursive=True))
        files += sorted(glob.glob(str(p / "**" / "*.json"), recursive=True))
        if not files:
            raise DataError(f"data folder {str(p)!r} holds no .jsonl or .json files")
        records = [r for f in files for r in read_jsonl(Path(f), check_images, bad)]
        return Source(str(p), ratio, records)
    if p.suffix in (".jsonl", ".json"):
        return Source(str(p), ratio, read_jsonl(p, check_images, bad))
    if p.suffix in (".yml", ".yaml"):
        real = p.resolve()
        if real in _seen:
            raise DataError(f"mix {str(p)!r} includes itself")
        try:
            cfg = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise DataError(f"{p}: not valid YAML ({e})") from e
        entries = cfg.get("data") if isinstance(cfg, dict) else None
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{p}: a mix needs a non-empty 'data:' list of {{path, ratio}} entries")
        children = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or "path" not in entry:
                raise DataError(f"{p}: data entry {k} needs a 'path'")
            r = entry.get("ratio", 1.0)
            if not isinstance(r, (int, float)) or r < 0:
                raise DataError(f"{p}: data entry {k} has ratio {r!r}; ratios must be numbers >= 0")
            sub = entry["path"] if os.path.isabs(entry["path"]) else p.parent / entry["path"]
            children.append(load_source(sub, float(r), check_images, bad, (*_seen, real)))
        return Source(str(p), ratio, children=children)
    raise DataError(f"unsupported data file {str(p)!r}: use .jsonl, .json, .yml/.yaml or a folder")


@dataclass
class DataConfig:
    path: str = ""
    max_input_pixels: int | list[int] = 1024 * 1024  # one value, or one per number of input images
    max_output_pixels: int = 1024 * 1024
    max_side_length: int | None = 2048
    size_multiple: int = 16
    prompt_dropout: float = 0.0
    ref_image_dropout: float = 0.0  # applies to samples whose prompt was dropped (the guidance branches)
    caption_prefix_drop: float = 0.5
    # The share of samples whose text ends with the assistant's generation prompt, the form a chat turn that
    # answers <|img|> conditions on (OmniGen2ChatPipeline); the generation pipeline's form has none.
    generation_prompt_prob: float = 0.0
    # Chat-form samples with input images show them to the MLLM as a chat turn does (image slots before the
    # instruction, through the ViT; OmniGen2ChatPipeline.drawing_conditioning). The generation pipeline encodes
    # the instruction alone, so without this a chat edit conditions the transformer on states it never saw.
    chat_images: bool = False
    max_token_len: int = 1024
    check_images: bool = True
    cache_latents: bool = True  # keep each image's VAE posterior in memory (inputs are re-used every epoch)
    # A safetensors file of VAE posteriors shared by runs on the same images and VAE (training/latent_cache.py):
    # read at the start, rewritten with the posteriors encoded since when a run ends.
    latent_cache_file: str | None = None


class MixtureDataset:
    """Deterministic weighted sampling over the records of a mix, with the original's preprocessing."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int = 0):
        if not cfg.path:
            raise DataError("data.path is empty: give a jsonl file, a folder or a yml mix")
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.bad: list[BadRecord] = []
        root = load_source(cfg.path, 1.0, cfg.check_images, self.bad)
        leaves = [(w, recs, name) for w, recs, name in root.flat() if w > 0]
        empty = [name for w, recs, name in leaves if not recs]
        for name in empty:
            logger.warning("data source %s has no usable records; its share goes to the others", name)
        leaves = [leaf for leaf in leaves if leaf[1]]
        if not leaves:
            raise DataError(f"no usable records in {cfg.path} ({len(self.bad)} bad records)")
        total = sum(w for w, _, _ in leaves)
        self.weights = np.array([w / total for w, _, _ in leaves])
        self.sources = [recs for _, recs, _ in leaves]
        self.source_names = [name for _, _, name in leaves]
        self.processor = OmniGen2ImageProcessor(vae_scale_factor=cfg.size_multiple)
        for b in self.bad:
            logger.warning("bad record %s: %s", b.where, b.reason)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def draw(self, step: int, position: int) -> tuple[int, int]:
        """(source, record) for a position of a global batch: a pure function of (seed, step, position)."""
        rng = np.random.default_rng([self.seed, step, position, 1])
        src = int(rng.choice(len(self.sources), p=self.weights))
        return src, int(rng.integers(len(self.sources[src])))

    def chat(self, instruction: str, generation_prompt: bool = False) -> str:
        # The dropped prompt uses the inference negative template (system prompt + empty user turn); the
        # original used a different system prompt here, so its unconditional branch never matched inference.
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": instruction}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _input_pixels(self, n: int) -> int:
        """The pixel budget of each of ``n`` input images (one value, or one per number of inputs)."""
        mip = self.cfg.max_input_pixels
        if isinstance(mip, list):
            return mip[min(n, len(mip)) - 1] if n else mip[0]
        return mip

    def _spec(self, path: str, max_pixels: int, rec: Record) -> ImageSpec:
        return ImageSpec(path, max_pixels, self.cfg.max_side_length, self.cfg.size_multiple, rec.where)

    def sample(self, step: int, position: int, load: bool = True) -> dict:
        """One sample: chat-templated text, reference images and the target — as (3, H, W) tensors in [-1, 1],
        or as lazy :class:`ImageSpec` with ``load=False``."""
        src, idx = self.draw(step, position)
        rec = self.sources[src][idx]
        rng = np.random.default_rng([self.seed, step, position, 2])
        instruction = rec.instruction
        if rec.is_t2i and float(rng.random()) < self.cfg.caption_prefix_drop:
            for prefix in CAPTION_PREFIXES:
                if prefix in instruction:
                    instruction = instruction.replace(prefix, "")
                    break
        drop_prompt = float(rng.random()) < self.cfg.prompt_dropout
        drop_refs = drop_prompt and float(rng.random()) < self.cfg.ref_image_dropout
        chat_form = self.cfg.generation_prompt_prob > 0 and float(rng.random()) < self.cfg.generation_prompt_prob
        text = self.chat("" if drop_prompt else instruction, chat_form)
        inputs = [] if drop_refs else rec.input_images
        refs = [self._spec(p, self._input_pixels(len(inputs)), rec) for p in inputs]
        target = self._spec(rec.output_image, self.cfg.max_output_pixels, rec)
        if load:
            refs, target = [r.load() for r in refs], target.load()
        return {
            "text": text,
            "instruction": instruction,
            "chat_images": self.cfg.chat_images and chat_form and not drop_prompt and bool(inputs),
            "refs": refs,
            "target": target,
            "task_type": rec.task_type,
            "where": rec.where,
            "source": src,
        }

    def batch(self, step: int, positions: range, load: bool = True) -> dict:
        items = [self.sample(step, p, load) for p in positions]
        tok = self.tokenizer(
            [it["text"] for it in items],
            padding="longest",
            padding_side="right",
            max_length=self.cfg.max_token_len,
            truncation=True,
            return_tensors="pt",
        )
        return {
            "input_ids": tok.input_ids,
            "attention_mask": tok.attention_mask,
            "instructions": [it["instruction"] for it in items],
            "chat_images": [it["chat_images"] for it in items],
            "refs": [it["refs"] for it in items],
            "targets": [it["target"] for it in items],
            "positions": list(positions),
            "where": [it["where"] for it in items],
            "sources": [it["source"] for it in items],
        }

    def image_specs(self):
        """Every image the mix can hand to the VAE, each once per resize rule: the records' inputs (with all
        of them kept, as ``sample`` keeps them unless the references are dropped) and their outputs."""
        for recs in self.sources:
            for rec in recs:
                for p in rec.input_images:
                    yield self._spec(p, self._input_pixels(len(rec.input_images)), rec)
                yield self._spec(rec.output_image, self.cfg.max_output_pixels, rec)

    def report(self) -> str:
        lines = [f"{len(self)} records in {len(self.sources)} sources; {len(self.bad)} bad records left out"]
        for w, name, recs in zip(self.weights, self.source_names, self.sources):
            lines.append(f"  {w:6.1%}  {len(recs):7d} records  {name}")
        return "\n".join(lines)
