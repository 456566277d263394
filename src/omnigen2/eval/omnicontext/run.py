"""``omnigen2 eval omnicontext`` end to end: load the items, generate every (prompt, seed) through
``omnigen2 batch`` (resumable; every process of an ``accelerate launch`` job takes its share), then, on the main
process only, judge each image for PF and SC and write ``OUT/omnicontext.json`` and ``OUT/omnicontext.md``.

Layout of ``OUT``: ``records.jsonl`` (the batch records), ``images/TASK_TYPE/KEY/SEED.png`` and
``images/manifest.jsonl`` (batch's), ``inputs/`` (images extracted from parquet files), ``judge_cache/`` (every
judge reply), and the reports.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .data import Item, load_items
from .judge import DIMENSIONS, SHORT, Judge, JudgeConfig, ReplyCache, build_request, load_templates
from .score import Sample, combine, markdown, summarize

# The original's evaluation settings (its omnicontext/inference.py defaults, run with resolution alignment off).
ORIGINAL_NEGATIVE_PROMPT = (
    "(((deformed))), blurry, over saturation, bad anatomy, disfigured, poorly drawn face, mutation, mutated, "
    "(extra_limb), (ugly), (poorly drawn hands), fused fingers, messy drawing, broken legs censor, censored, "
    "censor_bar"
)


@dataclass
class EvalOptions:
    model: str
    data: str
    out: str
    judge: JudgeConfig
    templates: str | None = None  # a rubric file; None: the bundled one
    samples: int = 1  # seeds per prompt: seed, seed + 1, ...
    seed: int = 0
    language: str | None = "en"
    steps: int = 50
    height: int = 1024
    width: int = 1024
    text_guidance: float = 5.0
    image_guidance: float = 2.0
    negative_prompt: str = ORIGINAL_NEGATIVE_PROMPT
    align_res: bool = False
    dtype: str = "bf16"
    device: str | None = None
    batch_flags: list[str] = field(default_factory=list)  # more `omnigen2 batch` flags, e.g. ["--teacache"]
    progress: bool = True


def record_id(item: Item, seed: int) -> str:
    return f"{item.name}/{seed}"


def write_records(items: list[Item], opts: EvalOptions, out: Path) -> Path:
    """``OUT/records.jsonl``: one batch record per (item, seed). Images extracted under OUT are named relative to
    it (the folder can move), others absolutely. Every process writes the same bytes; the rename is atomic."""
    lines = []
    for item in items:
        images = [os.path.relpath(p, out) if p.is_relative_to(out.resolve()) else str(p) for p in item.input_images]
        for k in range(opts.samples):
            rec = {"id": record_id(item, opts.seed + k), "prompt": item.instruction, "input_images": images}
            lines.append(json.dumps({**rec, "seed": opts.seed + k}, ensure_ascii=False))
    path = out / "records.jsonl"
    tmp = path.with_name(f"records.jsonl.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def generate(records: Path, opts: EvalOptions, out: Path) -> int:
    """Run ``omnigen2 batch`` on the records (this process's share under accelerate); its exit status."""
    from ...cli import build_parser

    argv = ["batch", str(records), "-o", str(out / "images"), "--model", opts.model, "--dtype", opts.dtype]
    argv += ["--steps", str(opts.steps), "--height", str(opts.height), "--width", str(opts.width)]
    argv += ["--text-guidance", str(opts.text_guidance), "--image-guidance", str(opts.image_guidance)]
    argv += [f"--negative-prompt={opts.negative_prompt}"]
    argv += ["--device", opts.device] if opts.device else []
    argv += [] if opts.align_res else ["--no-align-res"]
    args = build_parser().parse_args([*argv, *opts.batch_flags])
    return args.func(args)


def _manifest(out: Path) -> dict[str, dict]:
    lines = (json.loads(x) for x in (out / "images" / "manifest.jsonl").read_text(encoding="utf-8").splitlines())
    return {line["id"]: line for line in lines if "id" in line}


def judge_samples(items: list[Item], opts: EvalOptions, out: Path) -> tuple[list[Sample], int]:
    """Every sample judged for PF and SC (from the cache where it can); (samples, requests sent)."""
    manifest = _manifest(out)
    rubric = load_templates(opts.templates)
    samples, jobs = [], []
    for item in items:
        for k in range(opts.samples):
            rid = record_id(item, opts.seed + k)
            line = manifest.get(rid, {})
            ok = line.get("status") in ("done", "skipped") and (out / "images" / line["file"]).is_file()
            s = Sample(item.task_type, item.key, opts.seed + k, rid, f"images/{line['file']}" if ok else None)
            if not ok:
                s.errors = [f"generation failed: {line.get('error', 'no manifest line')}"]
            else:
                jobs += [(s, item, dim) for dim in DIMENSIONS]
            samples.append(s)
    judge = Judge(opts.judge, ReplyCache(out / "judge_cache"))
    sent = 0
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="omnicontext judge", unit="req")

    def ask(s: Sample, item: Item, dim: str):
        payload = build_request(opts.judge.model, rubric, dim, item.instruction, item.input_images, out / s.image)
        return judge(payload)

    results = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, opts.judge.concurrency)) as pool:
            futures = {pool.submit(ask, *job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        judge.close()
        if bar is not None:
            bar.close()
    for i, (s, _, dim) in enumerate(jobs):  # in job order (PF then SC), whatever order the replies came in
        result, short = results[i], SHORT[dim]
        sent += result.requests
        if result.score is None:
            s.errors = [*(s.errors or []), f"{short}: {result.error}"]
        else:
            setattr(s, short, result.score)
            setattr(s, f"{short}_scores", result.scores)
            setattr(s, f"{short}_reasoning", result.reasoning)
    return samples, sent  # a sample with an error lacks PF or SC: no overall, left out of every mean


def report(samples: list[Sample], opts: EvalOptions, rubric_name: str, seconds: float) -> dict:
    seeds = [opts.seed + k for k in range(opts.samples)]
    per_seed = [summarize([s for s in samples if s.seed == seed]) for seed in seeds]
    failures = [{"id": s.id, "task_type": s.task_type, "key": s.key, "seed": s.seed, "errors": s.errors}
                for s in samples if s.errors]  # fmt: skip
    return {
        "benchmark": "OmniContext",
        "model": opts.model,
        "data": str(opts.data),
        "language": opts.language,
        "judge": {"url": opts.judge.url, "model": opts.judge.model, "rubric": rubric_name},
        "generation": {
            "steps": opts.steps,
            "height": opts.height,
            "width": opts.width,
            "text_guidance": opts.text_guidance,
            "image_guidance": opts.image_guidance,
            "negative_prompt": opts.negative_prompt,
            "align_res": opts.align_res,
            "dtype": opts.dtype,
            "extra_batch_flags": opts.batch_flags,
        },  # fmt: skip
        "seeds": seeds,
        "scores": combine(per_seed),
        "per_seed": [{"seed": seed, "scores": run} for seed, run in zip(seeds, per_seed)],
        "failures": failures,
        "samples": [s.to_dict() for s in samples],
        "seconds": round(seconds, 3),
    }


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun on every process


def run_omnicontext(opts: EvalOptions) -> dict | None:
    """Generate, judge and score; the report (None on the other processes of an accelerate job)."""
    if opts.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {opts.samples}")
    if opts.judge.concurrency < 1:
        raise ValueError(f"--judge-concurrency must be >= 1, got {opts.judge.concurrency}")
    start = time.perf_counter()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rubric = load_templates(opts.templates)  # a bad rubric file stops before any work
    items = load_items(opts.data, out, opts.language)
    if not items:
        raise ValueError(f"{opts.data} holds no items")
    generate(write_records(items, opts, out), opts, out)
    if not _is_main_process():
        return None
    samples, sent = judge_samples(items, opts, out)
    result = report(samples, opts, rubric["name"], time.perf_counter() - start)
    result["judge"]["requests_sent"] = sent
    table = markdown(result["scores"], opts.samples)
    _write(out / "omnicontext.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    title = f"# OmniContext: {opts.model}\n\njudge {opts.judge.model}, rubric {rubric['name']}, "
    _write(out / "omnicontext.md", title + f"{opts.samples} seed(s) per prompt\n\n" + table)
    print(table, end="")
    for f in result["failures"][:20]:
        print(f"omnigen2 eval omnicontext: {f['id']}: {'; '.join(f['errors'])}", file=sys.stderr)
    print(f"{len(result['failures'])} failure(s); {sent} judge request(s) sent; wrote {out / 'omnicontext.json'}")
    return result


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
