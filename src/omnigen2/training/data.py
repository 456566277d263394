"""Training data in the original OmniGen2 format.

A **record** is one jsonl line::

    {"task_type": "t2i" | "edit" | "ic" (or longer names containing them),
     "instruction": "...", "input_images": ["a.png", ...] | null, "output_image": "out.png"}

with image paths relative to the jsonl file (absolute paths also work). A **mix** is a yml file::

    data:
      - {path: t2i/records.jsonl, ratio: 2}
      - {path: edit/, ratio: 1}          # a folder: every *.jsonl / *.json below it
      - {path: more/mix.yml, ratio: 1}   # a nested mix; its own ratios split its share

Files follow JSON Lines: records are split on "\\n" only (a trailing "\\r" and a UTF-8 BOM are dropped, blank
lines skipped), so U+2028 and the other characters JSON allows inside strings never split a record; a ``.json``
file may instead hold one array, its items numbered by the line they start on. Ratios must be finite numbers
>= 0, not all 0.

Ratios are honoured by weighted sampling: each draw picks a source with probability ratio / total, then a
record of that source uniformly (the original computes resampled index lists and then drops them, so its
ratios have no effect). Records are validated when the data is indexed; bad ones are reported with
``file:line`` and the reason, counted, and left out — never silently replaced by another sample. Indexing
checks what a draw would fail on: fields, image files (header and Pillow's verify; a full decode with
``data.decode_images``), the pixel bound of :func:`omnigen2.images.load_image`, the resize rules, and, given
the transformer's ``PositionTable``, whether a sample fits it. What it cannot see (pixel data corrupt behind a
sound header without ``decode_images``) stops the run when drawn, naming the file and ``file:line``.

Sampling is a pure function of (seed, step, position): the same run, resumed or split over processes, sees
the same samples with the same dropout decisions.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml

from .. import jsonl
from ..errors import DataError, ImageError
from ..images import MAX_IMAGE_PIXELS, load_image
from ..models.transformer_omnigen2 import MAX_REF_IMAGES, PositionTable
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
        # Shares relative to the largest ratio first: a sum of ratios near 1e308 would overflow to inf
        top = max(c.ratio for c in self.children)
        total = sum(c.ratio / top for c in self.children)
        return [leaf for c in self.children for leaf in c.flat(weight * (c.ratio / top) / total)]


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
        img = self.pil()
        proc = OmniGen2ImageProcessor(vae_scale_factor=self.size_multiple)
        try:
            return proc.preprocess_reference(img, self.max_pixels, self.max_side_length)[0]
        except ValueError as e:
            raise DataError(f"{self.where}: image {self.path!r}: {e}") from e

    def pil(self) -> PIL.Image.Image:
        """The image as a user would hand it to the chat pipeline: the file, not resized."""
        try:
            return load_image(self.path)
        except ImageError as e:
            raise DataError(f"{self.where}: {e}") from e

    def size(self) -> tuple[int, int]:
        """The (H, W) that ``load`` returns, read from the file header only."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                with PIL.Image.open(self.path) as im:
                    w, h = im.size
        except Exception as e:  # noqa: BLE001 - any failure makes the record unusable
            raise DataError(f"{self.where}: image {self.path!r} cannot be read ({type(e).__name__}: {e})") from e
        proc = OmniGen2ImageProcessor(vae_scale_factor=self.size_multiple)
        try:
            return proc.target_size(h, w, self.max_pixels, self.max_side_length)
        except ValueError as e:
            raise DataError(f"{self.where}: image {self.path!r}: {e}") from e


def probe_image(path: str, decode: bool) -> tuple[int, int] | BadRecord:
    """(width, height) of an image file, or why it cannot be used (``where`` left empty).

    Without ``decode``: the header and Pillow's ``verify`` (for PNG every chunk's CRC, without inflating the
    pixels; for JPEG little beyond the header): about 1 ms for a 1 MP PNG, 0.1 ms for a JPEG. With ``decode``:
    also the full decode the trainer does when the image is drawn (load_image): about 20 ms for a 1 MP PNG,
    7 ms for a JPEG (one core)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 MP and refuses above 178 MP; this module's own bound is lower
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    return _bad(
                        "", "too many pixels", f"image {path!r} is {w}x{h} = {w * h} pixels, above {MAX_IMAGE_PIXELS}"
                    )
                im.verify()
    except PIL.Image.DecompressionBombError as e:
        return _bad("", "too many pixels", f"image {path!r}: {e}")
    except Exception as e:  # noqa: BLE001 - any failure makes the record unusable
        return _bad("", "image unreadable", f"image {path!r} is not a readable image ({type(e).__name__}: {e})")
    if w < 1 or h < 1:
        return _bad("", "image size", f"image {path!r} is empty ({w}x{h})")
    if decode:
        try:
            load_image(path)
        except ImageError as e:
            return _bad("", "image unreadable", str(e))
    return w, h


@dataclass
class BadRecord:
    where: str
    reason: str
    kind: str = "other"  # a short class of the reason, for the summary of "no usable records"


def _bad(where: str, kind: str, reason: str) -> BadRecord:
    return BadRecord(where, reason, kind)


def _file_line(b: BadRecord) -> tuple[str, int]:
    path, _, line = b.where.rpartition(":")
    return path, int(line) if line.isdigit() else 0


def parse_record(obj, base: Path, where: str) -> Record | BadRecord:
    """A record from a parsed JSON value: fields typed, image paths resolved and present. The images' contents
    are checked by :meth:`MixtureDataset._image_problem`, which knows the resize rules."""
    if not isinstance(obj, dict):
        return _bad(where, "not an object", f"a record must be a JSON object, got {type(obj).__name__}")
    for key in ("task_type", "instruction", "output_image"):
        if key not in obj:
            return _bad(where, "missing field", f"missing field {key!r}")
    task, instruction = obj["task_type"], obj["instruction"]
    if not isinstance(task, str) or not any(t in task for t in TASK_TYPES):
        return _bad(where, "task_type", f"unknown task_type {task!r} (expected t2i, edit or ic)")
    if not isinstance(instruction, str):
        return _bad(where, "instruction", f"instruction must be a string, got {instruction!r:.60}")
    if not instruction.strip():
        return _bad(where, "instruction", "empty instruction")
    inputs = obj.get("input_images")
    inputs = [] if inputs is None else [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(p, str) and p for p in inputs):
        return _bad(where, "input_images", f"input_images must be a list of paths, got {obj['input_images']!r:.80}")
    if len(inputs) > MAX_REF_IMAGES:
        return _bad(where, "input_images", f"{len(inputs)} input images; at most {MAX_REF_IMAGES} are supported")
    if not isinstance(obj["output_image"], str) or not obj["output_image"]:
        return _bad(where, "output_image", f"output_image must be a path, got {obj['output_image']!r:.80}")
    resolve = lambda p: str(p if os.path.isabs(p) else (base / p))  # noqa: E731
    inputs, output = [resolve(p) for p in inputs], resolve(obj["output_image"])
    for p in [*inputs, output]:
        if not os.path.isfile(p):
            return _bad(where, "image missing", f"image {p!r} does not exist")
    return Record(task, instruction, inputs, output, where)


def _json_array(path: Path, text: str):
    """(line number, item) of a top-level JSON array, each item numbered by the line it starts on."""
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    i = ws.match(text, text.index("[") + 1).end()
    if text.startswith("]", i):
        return
    while True:
        try:
            obj, i = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: not valid JSON ({e})") from e
        yield text.count("\n", 0, i) + 1, obj
        i = ws.match(text, i).end()
        sep = text[i : i + 1]
        i = ws.match(text, i + 1).end()
        if sep == "]" and i == len(text):
            return
        if sep != ",":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: not valid JSON (expected ',' or ']')")


def read_jsonl(path: Path, bad: list[BadRecord]) -> list[Record]:
    """The usable records of a .jsonl file (or a .json file holding one array, or JSON Lines); the others are
    appended to ``bad`` with ``file:line`` and the reason."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read ({e.strerror or e})") from e
    items = []
    head = data.removeprefix(codecs.BOM_UTF8).lstrip()
    if path.suffix == ".json" and head.startswith(b"["):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from e
        items = list(_json_array(path, text))
    else:
        for lineno, raw in jsonl.lines(data):
            try:
                items.append((lineno, jsonl.decode(raw)))
            except ValueError as e:
                bad.append(_bad(f"{path}:{lineno}", "invalid JSON", f"invalid JSON: {e}"))
    records = []
    for lineno, obj in items:
        rec = parse_record(obj, path.parent, f"{path}:{lineno}")
        (bad if isinstance(rec, BadRecord) else records).append(rec)
    return records


def _ratio(p: Path, k: int, entry) -> float:
    """The ratio of a mix entry: a finite number >= 0. A numeric string is read as its number, as the config's
    float fields do (YAML 1.1 reads ``1e-5``, without a dot, as a string); a bool, another string, NaN or inf is
    refused."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise DataError(f"{p}: data entry {k} needs a 'path' (a string), got {entry!r:.80}")
    unknown = sorted(set(entry) - {"path", "ratio"})
    if unknown:
        raise DataError(f"{p}: data entry {k} ({entry['path']}): unknown key(s) {unknown}; valid: path, ratio")
    r = entry.get("ratio", 1.0)
    if isinstance(r, str):
        try:
            r = float(r)
        except ValueError:
            pass
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
        raise DataError(f"{p}: data entry {k} ({entry['path']}) has ratio {r!r}; a ratio must be a finite number >= 0")
    return float(r)


def load_source(
    path: str | os.PathLike,
    ratio: float = 1.0,
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
        records = [r for f in files for r in read_jsonl(Path(f), bad)]
        return Source(str(p), ratio, records)
    if p.suffix in (".jsonl", ".json"):
        return Source(str(p), ratio, read_jsonl(p, bad))
    if p.suffix in (".yml", ".yaml"):
        real = p.resolve()
        if real in _seen:
            raise DataError(f"mix {str(p)!r} includes itself")
        try:
            cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid YAML ({e})") from e
        entries = cfg.get("data") if isinstance(cfg, dict) else None
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{p}: a mix needs a non-empty 'data:' list of {{path, ratio}} entries")
        ratios = [_ratio(p, k, entry) for k, entry in enumerate(entries)]
        if not any(ratios):
            raise DataError(f"{p}: every ratio is 0 ({ratios}); give at least one entry a ratio > 0")
        children = []
        for entry, r in zip(entries, ratios):
            sub = entry["path"] if os.path.isabs(entry["path"]) else p.parent / entry["path"]
            children.append(load_source(sub, r, bad, (*_seen, real)))
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
    # Indexing reads each image's header and verifies it (probe_image): missing, unreadable, oversized and
    # unresizable images are reported and left out. decode_images also decodes each once (~20 ms per MP): the
    # only way to find files whose pixel data is corrupt behind a sound header, which otherwise stop the run
    # when drawn (naming the file and the record).
    check_images: bool = True
    decode_images: bool = False
    cache_latents: bool = True  # keep each image's VAE posterior in memory (inputs are re-used every epoch)
    # A safetensors file of VAE posteriors shared by runs on the same images and VAE (training/latent_cache.py):
    # read at the start, rewritten with the posteriors encoded since when a run ends.
    latent_cache_file: str | None = None


class MixtureDataset:
    """Deterministic weighted sampling over the records of a mix, with the original's preprocessing."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int = 0, positions: PositionTable | None = None):
        if not cfg.path:
            raise DataError("data.path is empty: give a jsonl file, a folder or a yml mix")
        self.cfg, self.tokenizer, self.seed, self.positions = cfg, tokenizer, seed, positions
        self.processor = OmniGen2ImageProcessor(vae_scale_factor=cfg.size_multiple)
        self.bad: list[BadRecord] = []
        root = load_source(cfg.path, 1.0, self.bad)
        leaves = [(w, recs, name) for w, recs, name in root.flat() if w > 0]
        if cfg.check_images:
            probes: dict[str, tuple[int, int] | BadRecord] = {}  # an image shared by many records is read once
            leaves = [(w, self._usable(recs, probes), name) for w, recs, name in leaves]
        self.bad.sort(key=_file_line)  # in file order: structure problems are found before image ones
        for b in self.bad:
            logger.warning("bad record %s: %s", b.where, b.reason)
        for name in (name for _, recs, name in leaves if not recs):
            logger.warning("data source %s has no usable records; its share goes to the others", name)
        leaves = [leaf for leaf in leaves if leaf[1]]
        if not leaves:
            raise DataError(self._no_records())
        total = sum(w for w, _, _ in leaves)
        self.weights = np.array([w / total for w, _, _ in leaves])
        self.sources = [recs for _, recs, _ in leaves]
        self.source_names = [name for _, _, name in leaves]

    def _no_records(self) -> str:
        if not self.bad:
            return f"no usable records in {self.cfg.path}: it holds no records"
        counts = ", ".join(f"{n} {kind}" for kind, n in Counter(b.kind for b in self.bad).most_common())
        first = "; ".join(f"{b.where}: {b.reason}" for b in self.bad[:3])
        return f"no usable records in {self.cfg.path}: {len(self.bad)} bad records ({counts}); first: {first}"

    def _usable(self, recs: list[Record], probes: dict) -> list[Record]:
        keep = []
        for rec in recs:
            problem = self._problem(rec, probes)
            if problem is None:
                keep.append(rec)
            else:
                self.bad.append(BadRecord(rec.where, problem.reason, problem.kind))
        return keep

    def _problem(self, rec: Record, probes: dict) -> BadRecord | None:
        """Why a record would fail when drawn (an image that cannot be read or resized, a sample beyond the
        transformer's position table), or None. Checks what ``sample`` and the trainer do with it."""
        budget = self._input_pixels(len(rec.input_images))
        rules = [(p, budget) for p in rec.input_images] + [(rec.output_image, self.cfg.max_output_pixels)]
        sizes = []  # (H, W) after resizing: the inputs, then the output
        for path, max_pixels in rules:
            if path not in probes:
                probes[path] = probe_image(path, self.cfg.decode_images)
            wh = probes[path]
            if isinstance(wh, BadRecord):
                return wh
            try:
                sizes.append(self.processor.target_size(wh[1], wh[0], max_pixels, self.cfg.max_side_length))
            except ValueError as e:
                return _bad("", "image size", f"image {path!r}: {e}")
        return self._rope_problem(rec, sizes) if self.positions is not None else None

    def _rope_problem(self, rec: Record, sizes: list[tuple[int, int]]) -> BadRecord | None:
        table = self.positions
        for path, size in zip([*rec.input_images, rec.output_image], sizes):
            if not table.image_fits(size):
                rows, cols = table.grid(size)
                return _bad(
                    "",
                    "too large for the model",
                    f"image {path!r} resizes to {cols}x{rows} tokens; the transformer's position table holds "
                    f"{table.axes_lens[2]}x{table.axes_lens[1]} (axes_lens): lower data.max_side_length",
                )
        room = table.text_room(sizes[:-1])
        # The longest text a sample of this record can have (dropout only shortens it); tokenized only when the
        # token budget alone could overflow the table
        text = self.cfg.max_token_len
        if text > room:
            text = self._text_len(rec)
        if text > room:
            return _bad(
                "",
                "too long for the model",
                f"{text} text tokens, and the input images leave room for {max(room, 0)} in the transformer's "
                f"position table (axes_lens {list(table.axes_lens)}): shorten the instruction or use fewer or "
                "smaller inputs",
            )
        return None

    def _text_len(self, rec: Record) -> int:
        text = self.chat(rec.instruction, self.cfg.generation_prompt_prob > 0)
        return len(self.tokenizer(text, max_length=self.cfg.max_token_len, truncation=True).input_ids)

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
