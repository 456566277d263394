"""The recipe of the bundled Shapes model, the paper's way, with the project's own code.

    python -m omnigen2.shapes.recipe --budget cpu --out runs/shapes        # ~2 h 20 min on 2 CPU cores
    python -m omnigen2.shapes.recipe --budget cpu-long --out runs/shapes   # the shipped model: ~18 h, resumable
    python -m omnigen2.shapes.recipe --budget gpu --out runs/shapes        # a lent GPU
    python -m omnigen2.shapes.recipe --budget smoke --out /tmp/shapes      # minutes: checks the plumbing
    python -m omnigen2.shapes.recipe --budget my_budget.yml --out runs/mine
    python -m omnigen2.shapes.recipe --budget cpu-long --parts builtin:shapes --precondition-text --out runs/tf
        # only the transformer (and its chat phase), on the shipped tokenizer, VAE, MLLM and answering adapter

A budget is a YAML file (``budgets/NAME.yml``; ``budgets/__init__.py`` documents its fields) listing the stages
below with their settings, in this order. Each stage is skipped when its output exists, so an interrupted run
continues:
  1. data         Shapes World training cases (training seeds only) in the original jsonl format
  2. tokenizer    byte-level BPE over the grammar, Qwen special tokens, chat template
  3. vae          AutoencoderKL trained on rendered scenes (reconstruction error reported)
  4. mllm         Qwen2.5-VL trained from scratch on understanding (captions, counting, color, position)
  5. base         a pipeline directory: the frozen MLLM and VAE + a fresh transformer
  6. transformer  the budget's phases with the project's trainer (omnigen2 train), each from the previous one's EMA
                  weights: text-to-image only, then text-to-image + editing + in-context, then that mix on fresh
                  cases, once per further phase
  7. export       the last phase's EMA weights with the recommended sampling settings: OUT/final
  8. vision       a larger vision tower for understanding, trained with the language model frozen (the
                  transformer's text conditioning is unchanged), swapped into the final pipeline
  9. chat         transformer cycles in which chat-form edit and in-context samples show their images to the final
                  MLLM, as a chat turn conditions its drawing
 10. reflection   the answering LoRA adapter (understanding and judging), on understanding questions and the
                  model's own images labelled by the judge (skipped with --no-reflection)
 11. repair       a last transformer cycle that also learns the judge's fixes of the final model's own drawings:
                  what a reflection asks of the editing path

The last stage's folder is the result, and OUT/result.txt names it. Each training run keeps its metrics and
config and loses its checkpoints once exported (the learning curve, --curve, reads them first). The pipelines a
stage hands to the next repeat the frozen parts (and a reflection cycle's, the transformer): files they share
with the pipeline they came from are hard links, so they take their disk once; copy a folder before changing a
file in it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from .budgets import Budget, BudgetError, Data, Mllm, Pools, Reflection, Vae, Vision, budget_names, load_budget

logger = logging.getLogger(__name__)

EXTRA_SEED_OFFSET = 10**6  # the fresh cases' training seeds (the first data stage uses those from 0)
SHIFT_FACTOR = 3.0  # the fixed time shift of training and sampling (see _transformer_config)
SAMPLING = {
    "num_inference_steps": 16,
    "text_guidance_scale": 3.0,
    "image_guidance_scale": 1.5,
    "height": 64,
    "width": 64,
    # Reflection draws each repair 8 times and keeps the one the MLLM judges best (OmniGen2ChatPipeline.reflect):
    # with one, three repairs gained +0.043 on held-out text-to-image, with 8 +0.064 over four noise seeds (keeping
    # the best-scored match), and +0.079 after the repair cycle (docs/notes/reflection.md).
    "reflect_candidates": 8,
}
RESULT_FILE = "result.txt"  # OUT/result.txt: the name of the folder that holds the run's result


def _scene_batch(step: int, batch: int) -> torch.Tensor:
    """Random rendered scenes (inputs and targets of training cases) as (B, 3, 64, 64) in [-1, 1]."""
    from .tasks import IMAGE_TASKS, cases

    rng = random.Random(step)
    images = []
    while len(images) < batch:
        task = rng.choice(list(IMAGE_TASKS))
        (case,) = cases(task, 1, split="train", start=rng.randrange(10**7))
        images += [case.render_target(), *case.input_images()]
    arr = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images[:batch]])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


@torch.no_grad()
def vae_judge_pass_rate(vae, n_per_task: int = 40) -> float:
    """The fraction of held-out canonical targets that the judge still reads correctly after a VAE round trip:
    the ceiling any generator decoding through this VAE can reach."""
    from PIL import Image

    from . import judge
    from .tasks import IMAGE_TASKS, cases

    passed = total = 0
    for task in IMAGE_TASKS:
        for case in cases(task, n_per_task, split="eval"):
            x = torch.from_numpy(np.asarray(case.render_target(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            rec = vae.decode(vae.encode(x[None]).latent_dist.mode()).sample.clamp(-1, 1)[0]
            img = Image.fromarray(((rec.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
            passed += judge.check(case, img, case.input_images()).passed
            total += 1
    return passed / total


# -- 1 to 5: data, tokenizer, VAE, MLLM, base --------------------------------------------------------------------


def stage_data(out: Path, d: Data) -> Path:
    from .dataset import write_dataset

    workers = max(1, (os.cpu_count() or 1) - 1)
    if not (out / "data" / "mix.yml").is_file():
        write_dataset(out / "data", d.per_task, tasks=("t2i", "edit", "ic"), workers=workers)
    for task, n in (("understanding", d.understanding), ("reflection", d.understanding // 2)):
        if not (out / "data" / task / "records.jsonl").is_file():
            write_dataset(out / "data", n, tasks=(task,), workers=workers)
    more = out / "data" / "more"
    if d.fresh_per_task and not (more / "mix.yml").is_file():  # mix.yml is written last: the marker of completion
        write_dataset(more, 2 * d.fresh_per_task, EXTRA_SEED_OFFSET, tasks=("t2i",), workers=workers)
        write_dataset(more, 2 * d.fresh_per_task, EXTRA_SEED_OFFSET, tasks=("understanding",), workers=workers)
        write_dataset(more, d.fresh_per_task, EXTRA_SEED_OFFSET, tasks=("edit", "ic"), workers=workers)
    return out / "data"


def _corpus(data: Path):
    from ..pipelines.pipeline_omnigen2 import SYSTEM_PROMPT

    # The system prompts open every sequence: weigh them so that BPE merges their words into single tokens
    # (shorter sequences are cheaper to train on).
    for _ in range(1000):
        yield SYSTEM_PROMPT
    for path in data.glob("*/records.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for key in ("instruction", "question", "answer"):
                if rec.get(key):
                    yield rec[key]


PARTS = (("processor", "tokenizer"), ("vae", "vae"), ("mllm", "mllm"))  # (pipeline folder, recipe stage folder)


def stage_parts(out: Path, parts: str) -> Path:
    """Reuse the tokenizer, VAE and MLLM of an existing Shapes pipeline (a directory or ``builtin:shapes``): their
    stages then find their outputs and skip, and only the transformer trains, conditioned on that MLLM. Its vision
    tower is kept as it is (no vision stage), so its answering adapter (``mllm_reflection/``), trained on that
    MLLM, still fits and is carried into the final pipeline instead of a reflection stage. Returns the source."""
    from ..loading import resolve_path

    src = resolve_path(parts)
    missing = [folder for folder, _ in PARTS if not (src / folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"--parts {parts}: {src} has no {', '.join(f'{m}/' for m in missing)} folder")
    for folder, stage in PARTS:
        if not (out / stage).is_dir():
            shutil.copytree(src / folder, out / stage)
    return src


def stage_tokenizer(out: Path, data: Path):
    from transformers import AutoTokenizer

    from .mini import build_tokenizer

    path = out / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        build_tokenizer(_corpus(data)).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def stage_vae(out: Path, v: Vae):
    from diffusers import AutoencoderKL

    from .mini import VAE_CONFIG
    from .pretrain import train_vae, vae_reconstruction_error

    path = out / "vae"
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    train_vae(vae, lambda s: _scene_batch(s, v.batch), v.steps, lr=1e-3)
    err = vae_reconstruction_error(vae, lambda s: _scene_batch(s, 16))
    err["judge_pass_rate"] = vae_judge_pass_rate(vae)
    logger.info(
        "vae reconstruction on held-out renders: L1 %.4f, MSE %.5f (pixels in [0, 1]); the judge reads "
        "%.1f%% of round trips of canonical targets correctly",
        err["l1"],
        err["mse"],
        100 * err["judge_pass_rate"],
    )
    if err["judge_pass_rate"] < 0.99:
        logger.warning("the VAE loses details the judge needs: the generator cannot score higher than this")
    vae.save_pretrained(path)
    (path / "reconstruction.json").write_text(json.dumps(err))
    return vae


# What the MLLM learns before it is frozen: to answer questions about images, to judge an image against an
# instruction (reflection), and to answer an image instruction with <|img|> (the switch to the diffusion path).
MLLM_MIX = {"understanding": 0.5, "reflection": 0.25, "instruction": 0.25}


def mllm_examples(data: Path) -> dict[str, list[tuple[Path, list[str], str, str]]]:
    """(root, image paths, question, answer) per MLLM_MIX source, from the written training data."""
    from .tasks import IMAGE_TASKS

    def read(task):
        path = data / task / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    ex = {k: [] for k in MLLM_MIX}
    for task in ("understanding", "reflection"):
        ex[task] = [(data / task, [r["image"]], r["question"], r["answer"]) for r in read(task)]
    for task in IMAGE_TASKS:
        ex["instruction"] += [(data / task, r["input_images"], r["instruction"], "<|img|>") for r in read(task)]
    return ex


def _mllm_setup(data: Path, tokenizer, batch_size: int):
    """The batcher and a ``batch(step)`` of the MLLM_MIX examples (a pure function of the step)."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .mini import image_processor_config
    from .pretrain import UnderstandingBatcher

    cfg = {k: v for k, v in image_processor_config().items() if k not in ("image_processor_type", "processor_class")}
    batcher = UnderstandingBatcher(tokenizer, Qwen2VLImageProcessorPil(**cfg))
    examples = mllm_examples(data)
    sources = [k for k in MLLM_MIX if examples[k]]
    weights = [MLLM_MIX[k] for k in sources]

    def batch(step: int):
        rng = random.Random(step)
        picked = []
        for _ in range(batch_size):
            pool = examples[rng.choices(sources, weights)[0]]
            root, images, question, answer = pool[rng.randrange(len(pool))]
            picked.append(([Image.open(root / im).convert("RGB") for im in images], question, answer))
        return batcher(picked)

    return batcher, batch


def stage_mllm(out: Path, data: Path, tokenizer, m: Mllm):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .mini import mllm_config
    from .pretrain import train_mllm

    path = out / "mllm"
    if (path / "config.json").is_file():
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    batcher, batch = _mllm_setup(data, tokenizer, m.batch)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(mllm_config(tokenizer))
    train_mllm(model, batch, m.steps)
    model.save_pretrained(path)
    report = mllm_report(model, batcher)
    (path / "understanding.json").write_text(json.dumps(report, indent=2))
    logger.info("mllm on held-out cases: %s", report)
    return model


@torch.no_grad()
def mllm_report(model, batcher, n_per_category: int = 25) -> dict[str, float]:
    """Exact-match rates of greedy answers on held-out understanding and reflection cases, and how often an
    image instruction is answered with <|img|>."""
    from . import judge
    from .pretrain import answer
    from .tasks import IMAGE_TASKS, TASKS, cases

    report = {}
    for task in ("understanding", "reflection"):
        for case in cases(task, n_per_category * len(TASKS[task]), split="eval"):
            reply = answer(model, batcher, case.input_images(), case.prompt)
            key = f"{task}/{case.category}"
            report[key] = report.get(key, 0) + judge.check(case, reply, case.input_images()).passed / n_per_category
    for task in IMAGE_TASKS:
        hits = [answer(model, batcher, c.input_images(), c.prompt, 4) == "<|img|>" for c in cases(task, 30, "eval")]
        report[f"instruction/{task}"] = sum(hits) / len(hits)
    return {k: round(v, 3) for k, v in report.items()}


def stage_base(out: Path, tokenizer, mllm, vae) -> Path:
    """The pipeline the transformer's first phase starts from: the frozen MLLM and VAE and a fresh transformer."""
    from .bundle import assemble

    base = out / "base"
    if not (base / "model_index.json").is_file():
        shutil.rmtree(base, ignore_errors=True)
        assemble(base, tokenizer, mllm, vae, sampling_defaults=SAMPLING, shift_factor=SHIFT_FACTOR)
        for part in ("mllm", "vae"):
            _share_files(base / part, out / part)
    return base


# -- 6 and 7: the transformer's phases and the export ------------------------------------------------------------

# The fresh mix: each task's share as in the first mix, split over its first and fresh cases by their numbers
# (1 : 3 for text-to-image, 1 : 2 for editing and in-context).
MORE_MIX = [
    ("t2i", 0.125),
    ("more/t2i", 0.375),
    ("edit", 0.0833),
    ("more/edit", 0.1667),
    ("ic", 0.0833),
    ("more/ic", 0.1667),
]
# The transformer's data mixes (budgets.Transformer.mix): (mix file under OUT/data, [(records, ratio)]). "t2i" is
# text-to-image only, the paper's first stage: in the full mix from the start, the reference images explain most
# of the edit and in-context targets and the text was hardly learned (docs/notes/transformer.md, "Text-to-image
# first"). "first" is the full mix, half of it still text-to-image (drawing from the text alone is the slowest to
# learn). "fresh" continues it on fresh cases, a quarter of them the first data again.
MIXES = {
    "t2i": ("t2i_only.yml", [("t2i", 1.0)]),
    "first": ("phase2.yml", [("t2i", 0.5), ("edit", 0.25), ("ic", 0.25)]),
    "fresh": ("phase3.yml", MORE_MIX),
}


def _transformer_config(
    pretrained: Path,
    mix: Path,
    run: Path,
    *,
    steps: int,
    batch: int,
    lr: float,
    warmup: int,
    precondition_text: bool,
    schedule: str = "cosine",
) -> dict:
    """The trainer's config of one transformer run (``warmup``: at most a tenth of the run)."""
    return {
        "model": {"pretrained": str(pretrained)},
        "data": {
            "path": str(mix),
            "max_input_pixels": 4096,
            "max_output_pixels": 4096,
            "max_side_length": 64,
            "prompt_dropout": 0.1,
            "ref_image_dropout": 0.5,  # of the dropped-prompt samples: the unconditional branch
            # A third of the texts in the chat form (ending with the assistant's turn), so that a chat turn
            # answering <|img|> conditions the transformer as well as the generation pipeline does.
            "generation_prompt_prob": 0.3,
            "caption_prefix_drop": 0.0,
            "check_images": False,
            # Every phase reads the same images with the same VAE: encoded once, shared through this file
            "latent_cache_file": str(mix.parent / "latents.safetensors"),
        },
        # A fixed time shift towards noise, m = 3 (the base's scheduler samples with the same warp): the
        # prompt decides the image at the noisy end. The original's size rule gives m = 0.4 at 64 tokens
        # (towards the clean end) and without a shift the text was never learned (docs/SHAPES.md).
        "objective": {"time_shift": "fixed", "shift_factor": SHIFT_FACTOR, "time_sampler": "lognorm"},
        "train": {
            "steps": steps,
            "batch_size": batch,
            "lr": lr,
            "warmup_steps": min(warmup, steps // 10),
            "schedule": schedule,
            "min_lr_ratio": 0.05,
            "ema_decay": 0.999 if steps > 1000 else 0.9,
            "precondition_text": precondition_text,
        },
        "output": {
            "dir": str(run),
            "save_every": max(1, steps // 10),
            "keep_last": 11,  # every tenth of the run: the learning curve is measured on them
            "log_every": 50,
        },
    }


def _train(cfg: dict, record: Path) -> None:
    from ..training import Trainer, config_from_dict

    config = config_from_dict(cfg)
    record.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    Trainer(config).fit(resume="auto")


def _cycle(cfg: dict, record: Path, pipeline: Path, keep_checkpoints: bool = False) -> Path:
    """One transformer run (``cfg``, saved as ``record``) exported as the pipeline ``pipeline`` (EMA weights, the
    recommended sampling settings), where the next stage starts; done when that pipeline exists. Files it shares
    with the pipeline the run started from become hard links, and the run's checkpoints go once it is exported
    (``keep_checkpoints``: left for the learning curve); its metrics and config stay."""
    from ..training import export
    from ..training.checkpoint import CKPT_DIR

    run = Path(cfg["output"]["dir"])
    if not (pipeline / "model_index.json").is_file():
        _train(cfg, record)  # resumes from the run's latest checkpoint
        shutil.rmtree(pipeline, ignore_errors=True)  # a partial export: written anew, never over shared files
        export(run, pipeline, weights="ema", sampling_defaults=SAMPLING)
        _share_files(pipeline, Path(cfg["model"]["pretrained"]))
    if not keep_checkpoints:
        shutil.rmtree(run / CKPT_DIR, ignore_errors=True)
    return pipeline


def phase_run(phase: int) -> tuple[str, str, str]:
    """(run folder, config record, exported pipeline) of transformer phase ``phase``: 1 text-to-image only, 2 the
    first mix, 3, 4, ... the fresh mix (the last phase's pipeline is OUT/final instead)."""
    if phase == 1:
        return "transformer_t2i", "t2i_config.yml", "t2i_pipeline"
    run = {2: "transformer_run", 3: "transformer_more"}.get(phase, f"transformer_more{phase - 2}")
    return run, "transformer_config.yml" if phase == 2 else f"phase{phase}_config.yml", f"phase{phase}_pipeline"


def stage_transformer(out: Path, data: Path, b: Budget, base: Path, keep_checkpoints: bool = False) -> Path:
    """Train the budget's phases, each from the previous one's EMA weights (the first from ``base``); the last
    one's are OUT/final, which this returns."""
    for name, sources in MIXES.values():
        mix = [{"path": f"{src}/records.jsonl", "ratio": r} for src, r in sources]
        (data / name).write_text(yaml.safe_dump({"data": mix}, sort_keys=False))
    final = out / "final"
    if (final / "model_index.json").is_file():
        return final
    first = 1 if b.transformer[0].mix == "t2i" else 2  # phase numbers name the folders
    init = base
    for phase, s in enumerate(b.transformer, start=first):
        run, record, pipeline = phase_run(phase)
        last = phase == first + len(b.transformer) - 1
        cfg = _transformer_config(
            init,
            data / MIXES[s.mix][0],
            out / run,
            steps=s.steps,
            batch=s.batch,
            lr=s.lr,
            warmup=s.warmup,
            schedule=s.schedule,
            precondition_text=b.precondition_text,
        )
        init = _cycle(cfg, out / record, final if last else out / pipeline, keep_checkpoints)
    logger.info("the transformer's phases exported to %s", final)
    return final


def _phase_runs(out: Path) -> list[str]:
    """The run folders of the transformer's phases in OUT, in phase order."""
    runs, phase = [], 1
    while phase <= 3 or (out / phase_run(phase)[0]).is_dir():
        runs += [phase_run(phase)[0]] if (out / phase_run(phase)[0]).is_dir() else []
        phase += 1
    return runs


def learning_curve(out: Path, n: int = 60, tasks: tuple[str, ...] = ("t2i", "edit", "ic")) -> list[dict]:
    """ShapesBench (``n`` held-out cases per task) of every kept checkpoint of the transformer's phases, with the
    EMA weights and the recommended sampling settings; written to OUT/learning_curve.json."""
    import tempfile

    from ..eval.shapesbench import evaluate_model
    from ..training import export
    from ..training.checkpoint import checkpoint_dirs

    path = out / "learning_curve.json"
    curve = json.loads(path.read_text()) if path.is_file() else []
    done = {row["step"] for row in curve}
    checkpoints, offset = [], 0
    for run in _phase_runs(out):  # steps counted over all phases
        steps = [(ck, int(ck.name.split("-")[1])) for ck in checkpoint_dirs(out / run)]
        checkpoints += [(run, ck, offset + step) for ck, step in steps]
        offset += max((step for _, step in steps), default=0)
    for run, ck, step in checkpoints:
        if step in done:
            continue
        tmp = Path(tempfile.mkdtemp())
        try:
            pipe_dir = export(ck, tmp / "pipe", weights="ema", sampling_defaults=SAMPLING)
            report = evaluate_model(str(pipe_dir), n, tasks, tmp / "bench", progress=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = {"step": step, "phase": run, **{t: round(report.task_score(t), 3) for t in tasks}}
        row["overall"] = round(report.overall, 3)
        if "ic" in tasks:
            row["ic_subject_consistency"] = round(report.partial("ic")["subject_consistency"]["score"], 3)
        logger.info("learning curve: %s", row)
        curve = sorted([*curve, row], key=lambda r: r["step"])
        path.write_text(json.dumps(curve, indent=2))
    return curve


# -- 8 and 9: the vision tower and the chat phase ----------------------------------------------------------------


def stage_vision(out: Path, data: Path, tokenizer, v: Vision, final: Path) -> Path:
    """Understanding needs a larger vision tower than the first MLLM stage trained; the language model, which
    conditions the transformer on text-only prompts, stays frozen, so the trained transformer keeps working.
    The new MLLM (OUT/mllm_vision) replaces FINAL/mllm."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .pretrain import new_vision_tower, train_mllm

    path = out / "mllm_vision"
    if (path / "config.json").is_file():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    else:
        batcher, batch = _mllm_setup(data, tokenizer, v.batch)
        torch.manual_seed(1)
        model = new_vision_tower(Qwen2_5_VLForConditionalGeneration.from_pretrained(final / "mllm"), v.depth, v.hidden)
        train_mllm(model, batch, v.steps)
        model.save_pretrained(path)
        report = mllm_report(model, batcher)
        (path / "understanding.json").write_text(json.dumps(report, indent=2))
        logger.info("mllm with the new vision tower on held-out cases: %s", report)
    shutil.rmtree(final / "mllm")  # written anew: its files may be links shared with the earlier pipelines
    model.save_pretrained(final / "mllm")
    _share_files(final / "mllm", path)
    return final


# The chat phase's data settings (and the repair cycle's after it): half the texts in the chat form, whose edit and
# in-context samples show their images to the MLLM as a chat turn does.
CHAT_DATA = {"generation_prompt_prob": 0.5, "chat_images": True}


def stage_chat(out: Path, data: Path, b: Budget, final: Path) -> Path:
    """The chat phase (one cycle per chat stage, each from the previous one's EMA): the transformer learns the
    conditioning of a chat turn that shows the MLLM its input images, from FINAL (after the vision stage, whose
    tower those images pass through); a generation-pipeline edit conditions on the instruction alone, and without
    this phase a chat edit drew from states the transformer never saw (docs/CHAT.md). Writes OUT/final_chat."""
    target = out / "final_chat"
    if (target / "model_index.json").is_file():
        return target
    init = final
    for k, s in enumerate(b.chat, start=1):
        run = out / f"transformer_chat{k if k > 1 else ''}"
        cfg = _transformer_config(
            init,
            data / MIXES["fresh"][0],
            run,
            steps=s.steps,
            batch=s.batch,
            lr=s.lr,
            warmup=s.warmup,
            precondition_text=b.precondition_text,
        )
        cfg["data"].update(CHAT_DATA)
        init = _cycle(cfg, out / f"chat{k}_config.yml", target if k == len(b.chat) else out / f"chat{k}_pipeline")
    return target


# -- 10: the answering adapter -------------------------------------------------------------------------------------

DOTTED_CAPTIONS = 8000  # training examples of tasks.dotted_captions, from seed DOTTED_SEED
DOTTED_SEED = 2 * 10**6


def _answer_examples(out: Path, rounds: list[Path], w: Pools) -> list[tuple[list, float]]:
    """The answering adapter's pools and their weights (budgets.Pools): the model's drawings in ``rounds`` the
    judge passed, those it failed (with the judge's problem and fix), the synthetic reflection cases of the
    training data (rendered mistakes), the understanding questions (the first data's and the fresh ones),
    captions of dot-rich scenes and the counting questions among the understanding ones. A pool of weight 0 is
    not read at all (an understanding cycle would otherwise load every round's images)."""
    from .reflection import read_records
    from .tasks import dotted_captions

    model = [ex for r in rounds for ex in read_records(r / "records.jsonl")] if w.match or w.mismatch else []
    understanding = [
        ex
        for path in (out / "data" / "understanding", out / "data" / "more" / "understanding")
        if (w.understanding or w.counting) and (path / "records.jsonl").is_file()
        for ex in read_records(path / "records.jsonl")
    ]
    pools = [
        ([ex for ex in model if ex[2].startswith("the image matches")], w.match),
        ([ex for ex in model if not ex[2].startswith("the image matches")], w.mismatch),
        (read_records(out / "data" / "reflection" / "records.jsonl") if w.synthetic else [], w.synthetic),
        (understanding, w.understanding),
        (dotted_captions(DOTTED_CAPTIONS, DOTTED_SEED) if w.dotted else [], w.dotted),
        ([ex for ex in understanding if ex[1].startswith("how many")], w.counting),
    ]
    return [(p, weight) for p, weight in pools if p and weight > 0]


def drawn_rounds(cycles: tuple[Reflection, ...]) -> list[int | None]:
    """Per cycle, the number of the round of drawings it makes (1, 2, ...; its seeds and its folder
    OUT/reflection_round{r}), or None."""
    out, r = [], 0
    for c in cycles:
        r += c.draw != "none"
        out.append(r if c.draw != "none" else None)
    return out


def _draw_round(source: Path, c: Reflection, r: int, data: Path) -> None:
    """Round ``r`` of drawings: the model at ``source`` draws ``c.cases`` training prompts per image task as
    ``c.draw`` says, and the judge labels each drawing (reflection.reflection_records), into ``data``."""
    from ..eval.shapesbench import chat_generate, pipeline_generate
    from ..pipelines import OmniGen2ChatPipeline
    from .reflection import reflection_records
    from .tasks import IMAGE_TASKS

    chat = OmniGen2ChatPipeline.from_pretrained(source)
    chat.set_progress_bar_config(disable=True)
    # A chat turn draws what a reflection judges: it conditions the drawing on the conversation, and draws edits
    # and in-context cases differently from the pipeline.
    draw = chat_generate(chat, force_draw=True) if c.draw == "chat" else pipeline_generate(chat.pipe)

    def generate(prompt, inputs, g):
        image = draw(prompt, inputs, g)
        if c.draw == "chat":
            return image.value  # the drawing (force_draw: the answer is always <|img|>)
        if c.draw == "pipeline":
            return image
        rounds = chat.reflect(image, prompt, 1, generator=g, height=64, width=64)
        return rounds[0].image or image  # the repaired image when the model found a problem

    summary = reflection_records(generate, c.cases, data, start=(r + 1) * 10**6, tasks=IMAGE_TASKS)
    logger.info("reflection round %d data: %s; fixes %s", r, summary.kinds, summary.fixes)


def stage_reflection(out: Path, final: Path, b: Budget) -> Path:
    """The paper's reflection data and the answering adapter (stored as ``mllm_reflection/``), one cycle per
    reflection stage of the budget, each continuing the adapter of the one before: a cycle that draws first has
    the model so far draw training prompts and the judge label them (standing in for the external VLM: a verdict,
    and for a mismatch its problem and one fixing edit); then the adapter trains on the cycle's pools (the drawn
    rounds, synthetic reflection cases, understanding questions, dot-rich captions; budgets.Reflection), with the
    cell probe where the cycle asks for it. Every cycle is saved as OUT/final_reflect_round{i} (i from 1), and a
    run continues after the last saved one. Writes OUT/final_reflect."""
    from ..loading import load_reflection_adapter
    from ..pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline
    from .pretrain import UnderstandingBatcher
    from .reflection import train_reflection_adapter

    target = out / "final_reflect"
    if (target / "model_index.json").is_file():
        return target
    cycles = b.reflection
    saved = [i for i in range(1, len(cycles) + 1) if (out / f"final_reflect_round{i}/model_index.json").is_file()]
    last = max(saved, default=0)  # an interrupted run continues after its last saved cycle, from its adapter
    source = out / f"final_reflect_round{last}" if last else final
    adapter = load_reflection_adapter(source) if last else None
    # Loaded once: each cycle trains a copy of this MLLM and saves it with that cycle's adapter.
    pipe = OmniGen2Pipeline.from_pretrained(final)
    pipe.reflection_adapter = None  # a clean MLLM: no adapter layers (not even those of a final that has one)
    plain = OmniGen2ChatPipeline(pipe)  # only for its tokenizer and image processor (the same in every cycle)
    batcher = UnderstandingBatcher(plain.tokenizer, plain.vision_processor)
    drawn: list[Path] = []
    for i, (c, r) in enumerate(zip(cycles, drawn_rounds(cycles), strict=True), start=1):
        if r is not None:
            data = out / f"reflection_round{r}"
            if i > last and not (data / "records.jsonl").is_file():
                _draw_round(source, c, r, data)
            drawn.append(data)
        if i <= last:
            continue
        pools = _answer_examples(out, drawn[-1:] if c.rounds == "last" else drawn, c.pools)
        rng = random.Random(i)
        n_examples = max(20000, 32 * c.steps)  # about one visit each
        examples = [rng.choice(rng.choices([p for p, _ in pools], [w for _, w in pools])[0]) for _ in range(n_examples)]
        adapter, _ = train_reflection_adapter(
            pipe.mllm, batcher, examples, c.steps, adapter=adapter, cell_aux=c.cell_probe, count_aux=c.count_term
        )
        pipe.reflection_adapter = adapter
        previous, source = source, out / f"final_reflect_round{i}"
        shutil.rmtree(source, ignore_errors=True)
        pipe.save_pretrained(source)
        _share_files(source, previous)
    shutil.copytree(source, target, copy_function=_link_or_copy)
    return target


# -- 11: the repair cycle ------------------------------------------------------------------------------------------

REPAIR_SEED = 3 * 10**7  # the repair cycle's training prompts (seeds from here, clear of the other stages')


def stage_repair(out: Path, data: Path, b: Budget, final: Path) -> Path:
    """The repair cycle: editing examples made of FINAL's own chat drawings of training prompts, each with the
    judge's one-edit fix and the fixed scene rendered as the target (:func:`reflection.repair_records`), a
    ``share`` of the batch beside the chat phase's mix, one cosine cycle from FINAL's transformer. The MLLM, its
    answering adapter and the VAE stay as they are. Writes OUT/final_repair."""
    from ..eval.shapesbench import chat_generate
    from ..pipelines import OmniGen2ChatPipeline
    from .reflection import repair_records

    r = b.repair
    target = out / "final_repair"
    if (target / "model_index.json").is_file():
        return target
    pairs = data / "repair"
    if not (pairs / "records.jsonl").is_file():
        chat = OmniGen2ChatPipeline.from_pretrained(final)
        chat.set_progress_bar_config(disable=True)
        draw = chat_generate(chat, force_draw=True)
        summary = repair_records(lambda p, i, g: draw(p, i, g).value, r.cases, pairs, start=REPAIR_SEED)
        logger.info("repair data: %d records; drawings %s; fixes %s", summary.records, summary.kinds, summary.fixes)
    mix = [{"path": f"{src}/records.jsonl", "ratio": ratio * (1 - r.share)} for src, ratio in MORE_MIX]
    mix.append({"path": "repair/records.jsonl", "ratio": r.share})
    (data / "repair.yml").write_text(yaml.safe_dump({"data": mix}, sort_keys=False))
    # The whitened caption projection whatever the budget's setting (it changes how training steps, not what the
    # model computes): the fixes are mostly recolourings, told apart by colour words the states barely separate.
    cfg = _transformer_config(
        final,
        data / "repair.yml",
        out / "transformer_repair",
        steps=r.steps,
        batch=r.batch,
        lr=r.lr,
        warmup=r.warmup,
        precondition_text=True,
    )
    cfg["data"].update(CHAT_DATA)
    return _cycle(cfg, out / "repair_config.yml", target)


# -- the run ---------------------------------------------------------------------------------------------------------


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _share_files(copy: Path, original: Path) -> None:
    """Make each file of the directory ``copy`` that is byte-identical to the same path under ``original`` a hard
    link to it: a pipeline handed from stage to stage repeats the frozen parts, which then take their disk once.
    The recipe never writes a pipeline's file in place (it writes a new folder or file), so the links stay
    separate copies in effect; where the filesystem has no hard links the copies stay."""
    for path in sorted(copy.rglob("*")):
        twin = original / path.relative_to(copy)
        if not (path.is_file() and twin.is_file()) or path.samefile(twin):
            continue
        if path.stat().st_size != twin.stat().st_size or not filecmp.cmp(path, twin, shallow=False):
            continue
        tmp = path.with_name(path.name + ".link")
        try:
            os.link(twin, tmp)
        except OSError:
            return
        os.replace(tmp, path)


def run(
    out: Path,
    budget: str | Path = "cpu",
    curve: int = 0,
    reflection: bool = True,
    parts: str | None = None,
    precondition_text: bool | None = None,
) -> Path:
    """The recipe's stages in order (``budget``: a shipped budget's name or a YAML file); each skips when its output
    exists. ``parts`` (a Shapes pipeline) supplies the tokenizer, VAE and MLLM (and the answering adapter) so only
    the transformer trains (stage_parts); ``precondition_text`` overrides the budget's. Returns the result's
    folder, which OUT/result.txt names."""
    b = load_budget(budget)
    if precondition_text is not None:
        b = replace(b, precondition_text=precondition_text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps({"budget": b.name, "parts": parts, **b.to_dict()}, indent=2))
    # 1-5. Data, tokenizer, VAE, MLLM (from --parts when given: their stages then find them) and the base.
    data = stage_data(out, b.data)
    src = stage_parts(out, parts) if parts else None
    tokenizer = stage_tokenizer(out, data)
    vae = stage_vae(out, b.vae)
    mllm = stage_mllm(out, data, tokenizer, b.mllm)
    base = stage_base(out, tokenizer, mllm, vae)
    # 6-7. The transformer's phases, the last one exported as OUT/final.
    final = stage_transformer(out, data, b, base, keep_checkpoints=curve > 0)
    if curve:
        from ..training.checkpoint import CKPT_DIR

        learning_curve(out, curve)
        for run_dir in _phase_runs(out):  # read: the exported phases need them no more
            shutil.rmtree(out / run_dir / CKPT_DIR, ignore_errors=True)
    # 8-9. The grown vision tower (reused parts keep theirs, which their adapter was trained with), the chat phase.
    if b.vision and src is None:
        stage_vision(out, data, tokenizer, b.vision, final)
    if b.chat:
        final = stage_chat(out, data, b, final)
    # 10-11. The answering adapter (reused parts bring theirs), the repair cycle.
    if src is not None:
        from ..loading import REFLECTION_ADAPTER_DIR

        adapter = src / REFLECTION_ADAPTER_DIR
        if adapter.is_dir() and not (final / REFLECTION_ADAPTER_DIR).is_dir():
            shutil.copytree(adapter, final / REFLECTION_ADAPTER_DIR)
    elif reflection and b.reflection:
        final = stage_reflection(out, final, b)
    if b.repair and (src is not None or reflection):
        final = stage_repair(out, data, b, final)
    (out / RESULT_FILE).write_text(f"{final.name}\n")
    logger.info("the result: %s (named in %s)", final, out / RESULT_FILE)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnigen2.shapes.recipe", description=__doc__.split("\n")[0])
    p.add_argument(
        "--budget",
        default="cpu",
        metavar="NAME|FILE",
        help=f"a shipped budget ({', '.join(budget_names())}) or a budget YAML file (default: cpu)",
    )
    p.add_argument("--out", default="runs/shapes")
    p.add_argument(
        "--curve", type=int, default=0, metavar="N", help="also score every kept checkpoint on N cases per task"
    )
    p.add_argument(
        "--no-reflection", action="store_true", help="stop before the answering adapter (no reflection, no repair)"
    )
    p.add_argument(
        "--parts",
        metavar="MODEL",
        help="reuse this Shapes pipeline's tokenizer, VAE, MLLM and answering adapter (e.g. builtin:shapes) and "
        "train only the transformer",
    )
    p.add_argument(
        "--precondition-text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the transformer with train.precondition_text (default: the budget's)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        load_budget(args.budget)
    except BudgetError as e:
        p.error(str(e))
    run(
        Path(args.out),
        args.budget,
        args.curve,
        reflection=not args.no_reflection,
        parts=args.parts,
        precondition_text=args.precondition_text,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
