"""The work of ``omnigen2 batch`` on one process or on each process of an ``accelerate launch`` job.

Every process parses the same records in the same order and takes every ``world``-th valid one, starting at its
rank. Before loading anything it sorts its share into done (the output exists, written with the same settings:
skipped), in conflict (it exists with other settings: an error) and to generate (input images checked), and writes
those lines into its part of the manifest. Each image is written to ``ID.png.tmp`` beside its final name and
renamed, so ``ID.png`` exists only complete and a killed run resumes where it stopped. The main process shows one
progress bar for the whole job by reading the other parts as they grow, then merges them in record order into
``OUT/manifest.jsonl`` and adds the summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .records import SAMPLING_FIELDS, Record, RecordError

MANIFEST = "manifest.jsonl"
PART = ".manifest.part-{}.jsonl"  # one per process while a job runs; the main process merges and removes them
_END = "_end"  # a part's last line: its process has written every line of its share


@dataclass
class BatchOptions:
    """What every process (or Ray actor) needs, picklable: where the records and outputs are, the model, and the
    command line's sampling flags (the defaults of every record)."""

    records: str
    out: str
    model: str
    dtype: str = "fp32"
    device: str | None = None
    allow_pickle: bool = False
    defaults: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)  # omnigen2.limits.Limits fields the command line raised

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


# -- one record --------------------------------------------------------------------------------------------------


def generate_args(rec: Record, opts: BatchOptions) -> argparse.Namespace:
    """The arguments ``omnigen2 generate`` would have parsed for this record: its call and its PNG parameters are
    built from them by the same functions."""
    return argparse.Namespace(
        prompt=rec.prompt,
        images=list(rec.input_images),
        num_images=1,
        model=opts.model,
        dtype=opts.dtype,
        device=opts.device,
        allow_pickle=opts.allow_pickle,
        **rec.settings,
    )


class Worker:
    """The pipeline, loaded once per process (or Ray actor), and the generation of one record.

    ``device`` is where the pipeline runs (``cuda:LOCAL_RANK`` under accelerate); the PNG parameters name the
    device as ``generate`` would (``--device``, else cuda when available), so files do not depend on the rank."""

    def __init__(self, opts: BatchOptions, device=None, process: int | str = 0):
        import torch

        from ..loading import parse_device, parse_dtype
        from ..pipelines import OmniGen2Pipeline

        self.opts, self.process = opts, process
        self.named_device = parse_device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = device if device is not None else self.named_device
        self.pipe = OmniGen2Pipeline.from_pretrained(
            opts.model, torch_dtype=parse_dtype(opts.dtype), device=self.device, allow_pickle=opts.allow_pickle
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.limits = dataclasses.replace(self.pipe.limits, **opts.limits)

    def generate(self, rec: Record) -> dict:
        """Generate and write ``rec``; its manifest line ("done", or "failed" with the reason)."""
        import torch

        from ..cli import _save_png, generate_call_kwargs, generate_png_params
        from ..images import load_image

        args = generate_args(rec, self.opts)
        t0 = time.perf_counter()
        try:
            images = [load_image(p) for p in rec.image_paths]
            generator = torch.Generator(device=self.device).manual_seed(args.seed)
            out = self.pipe(**generate_call_kwargs(args, images, generator))
            params = generate_png_params(args, self.opts.model, self.pipe, self.named_device)
            _save_png(out.images[0], self.opts.out_dir / rec.file, params)  # via ID.png.tmp, renamed
        except Exception as e:  # noqa: BLE001 - one bad record must not stop the others
            _tmp(self.opts.out_dir / rec.file).unlink(missing_ok=True)
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            return failed_line(rec, reason, self.process)
        return done_line(rec, time.perf_counter() - t0, self.process)


# -- before any work ---------------------------------------------------------------------------------------------


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")  # the name cli._save_png writes first


def output_state(rec: Record, opts: BatchOptions) -> str | None:
    """None: generate it. "skip": its PNG exists, written with this record's settings. Else why it conflicts."""
    from PIL import Image

    path = opts.out_dir / rec.file
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            params = json.loads(im.info["parameters"])
    except Exception:  # noqa: BLE001 - not one of ours (or damaged by hand): write it again
        return None
    want = {"prompt": rec.prompt, "input_images": list(rec.input_images), "model": str(opts.model), **rec.settings}
    if want["scheduler"] is None:
        del want["scheduler"]  # the PNG names the checkpoint's scheduler class
    differ = sorted(k for k in want if k in params and params[k] != want[k])
    if not differ:
        return "skip"
    shown = ", ".join(f"{k} {params[k]!r} there, {want[k]!r} here" for k in differ[:3])
    return f"{path} exists with other settings ({shown}); remove it to generate it again"


def plan(records: list[Record], opts: BatchOptions, process) -> tuple[list[Record], list[dict]]:
    """(records to generate, manifest lines of the others): outputs that exist complete are skipped, a killed
    run's temporary file is removed, and the input images of the rest are opened (missing or corrupt: failed)."""
    from ..images import ImageError, load_image

    pending, lines = [], []
    for rec in records:
        _tmp(opts.out_dir / rec.file).unlink(missing_ok=True)
        state = output_state(rec, opts)
        if state == "skip":
            lines.append(_line(rec, "skipped", process))
            continue
        if state is not None:
            lines.append(failed_line(rec, state, process))
            continue
        try:
            for p in rec.image_paths:
                load_image(p)
        except ImageError as e:
            lines.append(failed_line(rec, str(e), process))
            continue
        pending.append(rec)
    return pending, lines


# -- manifest lines ----------------------------------------------------------------------------------------------


def _line(rec: Record, status: str, process, **extra) -> dict:
    settings = {"prompt": rec.prompt, "input_images": list(rec.input_images)}
    settings.update((k, rec.settings[k]) for k in SAMPLING_FIELDS if k != "seed")
    line = {"id": rec.id, "status": status, "file": rec.file if status != "failed" else None, "line": rec.where}
    line.update(seed=rec.settings["seed"], settings=settings, **extra, process=process, _n=rec.n)
    return line


def done_line(rec: Record, seconds: float, process) -> dict:
    return _line(rec, "done", process, seconds=round(seconds, 4))


def failed_line(rec: Record, reason: str, process) -> dict:
    return _line(rec, "failed", process, error=f"{rec.where}: {reason}")


def error_line(err: RecordError) -> dict:
    """The manifest line of a record that could not be read."""
    return {"id": err.id, "status": "failed", "file": None, "line": err.where, "error": err.message, "_n": err.n}


def merge(lines: list[dict], records: list[Record], start: float, processes: int, engine: str) -> tuple[list, dict]:
    """Lines in record order (a valid record without a line: its process stopped before reaching it), then the
    summary. Every line but the summary differs between runs only in ``seconds`` and ``process``."""
    by_n = {line["_n"]: line for line in lines}
    for rec in records:
        if rec.n not in by_n:
            by_n[rec.n] = failed_line(rec, "not generated: its process stopped first (run again to resume)", None)
    merged = [{k: v for k, v in by_n[n].items() if k != "_n"} for n in sorted(by_n)]
    count = {s: sum(line["status"] == s for line in merged) for s in ("done", "skipped", "failed")}
    seconds = time.perf_counter() - start
    summary = {
        "records": len(merged),
        **count,
        "seconds": round(seconds, 3),
        "images_per_second": round(count["done"] / seconds, 4) if seconds > 0 else None,
        "processes": processes,
        "engine": engine,
    }
    return merged, summary


def write_manifest(out_dir: Path, merged: list[dict], summary: dict) -> Path:
    path = out_dir / MANIFEST
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for line in merged:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    tmp.replace(path)
    return path


def report(path: Path, merged: list[dict], summary: dict) -> int:
    """Print the errors and the summary; the exit status (1 when a record failed)."""
    failed = [line["error"] for line in merged if line["status"] == "failed"]
    for message in failed[:20]:
        print(f"omnigen2 batch: {message}", file=sys.stderr)
    if len(failed) > 20:
        print(f"omnigen2 batch: ... and {len(failed) - 20} more errors in {path}", file=sys.stderr)
    s = summary
    print(
        f"{s['done']} done, {s['skipped']} skipped, {s['failed']} failed of {s['records']} records in "
        f"{s['seconds']:.1f} s ({s['images_per_second'] or 0:.2f} images/s, {s['processes']} process(es)); "
        f"wrote {path}"
    )
    return 1 if failed else 0


# -- one process, or each process of an accelerate job -----------------------------------------------------------


class _Parts:
    """The main process's view of every process's part file: new lines since the last poll, and which ended."""

    def __init__(self, paths: list[Path]):
        self.paths, self.offsets, self.ended = paths, [0] * len(paths), [False] * len(paths)
        self.lines: list[dict] = []
        self.errors: list[str] = []

    def poll(self) -> int:
        new = 0
        for i, path in enumerate(self.paths):
            with open(path, "rb") as f:
                f.seek(self.offsets[i])
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
            self.offsets[i] += len(complete)
            for raw in complete.splitlines():
                line = json.loads(raw)
                if _END in line:
                    self.ended[i] = True
                    if line.get("error"):
                        self.errors.append(f"process {i}: {line['error']}")
                else:
                    self.lines.append(line)
                    new += 1
        return new


def _distributed(named_device):
    """(rank, world size, device of this process, barrier). One process: no process group at all."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, lambda: None
    from accelerate import PartialState

    # Without CUDA (or with --device cpu) cpu=True makes accelerate's processes use gloo (MULTI_CPU).
    state = PartialState(cpu=named_device.type != "cuda")
    device = state.device if named_device.type == "cuda" and named_device.index is None else None
    return state.process_index, state.num_processes, device, state.wait_for_everyone


def run_local(opts: BatchOptions, records: list[Record], errors: list[RecordError], start: float) -> int:
    """Generate this process's share of ``records``; the main process merges the manifest. Exit status."""
    import torch
    from tqdm.auto import tqdm

    from ..loading import parse_device

    named = parse_device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, device, barrier = _distributed(named)
    out_dir = opts.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    share = records[rank::world]
    pending, lines = plan(share, opts, rank)
    part = open(out_dir / PART.format(rank), "w", encoding="utf-8")  # noqa: SIM115 - closed in the finally
    main = rank == 0
    parts = _Parts([out_dir / PART.format(r) for r in range(world)]) if main else None
    bar = None
    failure = None
    try:
        for line in lines:
            part.write(json.dumps(line, ensure_ascii=False) + "\n")
        part.flush()
        barrier()  # every part is fresh before the main process reads any
        if main:
            bar = tqdm(total=len(records) + len(errors), initial=len(errors), desc="omnigen2 batch", unit="img")
            bar.update(parts.poll())
        worker = Worker(opts, device, rank) if pending else None
        for rec in pending:
            part.write(json.dumps(worker.generate(rec), ensure_ascii=False) + "\n")
            part.flush()
            if main:
                bar.update(parts.poll())
    except BaseException as e:
        failure = f"{type(e).__name__}: {e}"
        raise
    finally:
        part.write(json.dumps({_END: True, "error": failure}) + "\n")
        part.close()
    if not main:
        return 0
    while not all(parts.ended):
        time.sleep(0.2)
        bar.update(parts.poll())
    bar.update(parts.poll())
    bar.close()
    for message in parts.errors:
        print(f"omnigen2 batch: {message}", file=sys.stderr)
    merged, summary = merge([*map(error_line, errors), *parts.lines], records, start, world, "accelerate")
    path = write_manifest(out_dir, merged, summary)
    for stale in out_dir.glob(PART.format("*")):  # this run's parts, and those a killed larger run left
        stale.unlink(missing_ok=True)
    return report(path, merged, summary)
