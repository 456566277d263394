"""The recipe of the bundled Shapes model, the paper's way, with the project's own code.

    python -m omnigen2.shapes.recipe --budget cpu --out runs/shapes        # ~2 h 20 min on 2 CPU cores
    python -m omnigen2.shapes.recipe --budget cpu-long --out runs/shapes   # the shipped model: ~16 h, resumable
    python -m omnigen2.shapes.recipe --budget gpu --out runs/shapes        # a lent GPU
    python -m omnigen2.shapes.recipe --budget smoke --out /tmp/shapes      # minutes: checks the plumbing
    python -m omnigen2.shapes.recipe --budget cpu-long --parts builtin:shapes --precondition-text --out runs/tf
        # only the transformer (and its chat phase), on the shipped tokenizer, VAE, MLLM and answering adapter

Stages (each skipped when its output exists, so an interrupted run continues):
  1. data         Shapes World training cases (training seeds only) in the original jsonl format
  2. tokenizer    byte-level BPE over the grammar, Qwen special tokens, chat template
  3. vae          AutoencoderKL trained on rendered scenes (reconstruction error reported)
  4. mllm         Qwen2.5-VL trained from scratch on understanding (captions, counting, color, position)
  5. base         a pipeline directory: the frozen MLLM and VAE + a fresh transformer
  6. transformer  with the project's trainer (omnigen2 train), in the paper's phases: text-to-image only, then
                  text-to-image + editing + in-context; (extra_steps) phase 3, the mix on fresh cases, and
                  phases 4, 5, ...: further cycles of it
  7. export       the final pipeline, EMA weights, recommended sampling settings in the checkpoint
  8. vision       (vision_steps > 0) a larger vision tower for understanding, trained with the language model
                  frozen (the transformer's text conditioning is unchanged), swapped into the final pipeline
  9. chat         (chat_steps) last transformer cycles in which chat-form edit and in-context samples show
                  their images to the final MLLM, as a chat turn conditions its drawing
 10. reflection   the answering LoRA adapter (understanding and judging), on understanding questions and the
                  model's own images labelled by the judge (skipped with --no-reflection)
 11. repair       (repair_steps) a last transformer cycle that also learns the judge's fixes of the final
                  model's own drawings: what a reflection asks of the editing path
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    n_per_task: int  # training cases written per image task
    n_understanding: int
    vae_steps: int
    vae_batch: int
    mllm_steps: int
    mllm_batch: int
    transformer_steps: int  # phase 2, the full mix
    transformer_batch: int
    transformer_lr: float = 1e-3
    reflection_cases: int = 600  # generated training cases per image task and round
    reflection_steps: int = 600
    # Further cycles of the answering adapter after the reflection rounds, on the last round's pools (no new images):
    # understanding was still rising at the end of round 2.
    answer_steps: tuple[int, ...] = ()
    # Reflection rounds after the answer cycles (one entry each: its steps): new drawings of the final model in chat
    # turns, labelled by the judge; the adapter continues on this round's drawings alone (with the fixed pools), so
    # that it learns the mistakes the model makes now, as a reflection first judges them (its verdicts on its own
    # drawings fell from 0.860 to 0.810 when the transformer changed under an adapter trained on older drawings).
    redraw_steps: tuple[int, ...] = ()
    # Cycles of the answering adapter on the understanding questions alone, after the late rounds (one entry each:
    # its steps). In the mixed cycles understanding stalled near 0.6, and on understanding alone it kept rising
    # (0.645 -> 0.785 on 600 held-out questions over 8500 steps); they cost the verdict format, which the settling
    # round restores.
    understanding_steps: tuple[int, ...] = ()
    # A last late round after the understanding cycles (its steps; 0: none): new drawings of the final model, with
    # the understanding questions weighted up (SETTLE_POOLS) so that the adapter keeps what those cycles taught.
    settle_steps: int = 0
    # Cycles after the settling round that teach the answering adapter to read dots: the understanding questions
    # and captions of dot-rich scenes (DOT_POOLS), with the cell probe (shapes.cell_probe) at the given weight,
    # one (steps, probe weight) entry each. The vision tower had dropped the dot's colour, so captions never named
    # a dot (docs/BENCHMARKS.md, "The dot the vision tower drops").
    dot_steps: tuple[tuple[int, float], ...] = ()
    # Rounds on the settling round's drawings again, one entry (steps) each, the dot-rich captions among their
    # pools and the probe kept on (RESETTLE_AUX): the first (RESETTLE_POOLS) restores the verdicts the dot cycles
    # cost, the later ones (RESETTLE_LATE_POOLS) weight the understanding questions up again, which wins back the
    # counting, colour and position answers the dot cycles lowered.
    resettle_steps: tuple[int, ...] = ()
    # Counting rounds after the re-settling rounds (one entry, its steps, each): the settling round's drawings
    # again with the counting questions weighted up (COUNT_POOLS) and the probe's count term on (COUNT_AUX): the
    # tower kept each cell's shape, the answers miscounted (docs/BENCHMARKS.md, "Counting").
    count_steps: tuple[int, ...] = ()
    t2i_steps: int = 0  # phase 1 of the transformer, text-to-image only
    vision_steps: int = 0  # a grown vision tower, language model frozen (0: keep the first tower; see stage_vision)
    vision_depth: int = 4
    vision_hidden: int = 128
    # Phase 3 of the transformer (0: none): the full mix on fresh cases, extra_per_task per editing and in-context
    # and twice as many text-to-image (data/more/, training seeds from EXTRA_SEED_OFFSET), from the phase-2 EMA.
    extra_per_task: int = 0
    extra_steps: tuple[int, ...] = ()  # the steps of phases 3, 4, ... (one entry each), each a cosine cycle
    extra_lr: float = 5e-4
    # The chat phase, after the vision stage (one cosine cycle per entry, each from the previous one's EMA; none
    # when empty): the phase-3 mix with half the texts in the chat form, whose edit and in-context samples show
    # their images to the final MLLM (data.chat_images), as a chat turn conditions its drawing.
    chat_steps: tuple[int, ...] = ()
    # Train every transformer phase with train.precondition_text (the caption projection through a whitening of
    # its inputs): the miniature MLLM's states of different colours differ by a few percent, and from scratch the
    # preconditioned run follows the prompt several times more after phase 1 (docs/BENCHMARKS.md, "The colours the
    # conditioning hides").
    precondition_text: bool = False
    # The repair cycle, last (0 steps: none): the final model draws ``repair_cases`` training text-to-image
    # prompts in chat turns, the judge reads each drawing and names the edit that repairs it, and the transformer
    # learns those edits from its own drawings (``repair_share`` of the batch, the chat phase's mix otherwise):
    # a reflection's repair edits the model's drawing, while the editing data shows it rendered scenes only.
    repair_cases: int = 0
    repair_steps: int = 0
    repair_lr: float = 2e-4
    repair_share: float = 0.25


BUDGETS = {
    "smoke": Budget(
        16,
        32,
        4,
        4,
        4,
        4,
        4,
        4,
        reflection_cases=4,
        reflection_steps=2,
        answer_steps=(2,),
        redraw_steps=(2,),
        understanding_steps=(2,),
        settle_steps=2,
        dot_steps=((2, 1.0),),
        resettle_steps=(2,),
        count_steps=(2,),
        t2i_steps=2,
        vision_steps=2,
        extra_per_task=8,
        extra_steps=(2, 2, 2),
        chat_steps=(2, 2),
        repair_cases=8,
        repair_steps=2,
    ),
    # Measured on 2 cores (docs/BENCHMARKS.md): VAE 41 min, MLLM 36 min, transformer ~0.35 s/step in phase 1 and
    # ~0.5 s/step in phase 2 at batch 16 (2.8M parameters): ~2 h 20 min in all, and far from converged.
    "cpu": Budget(10000, 6000, 2000, 16, 4000, 32, 4500, 16, t2i_steps=2500, precondition_text=True),
    # One lent-GPU call (scripts/shapes_gpu.sh carries the CPU-trained tokenizer, VAE and MLLM, so only the data
    # and the transformer run there); the steps are a guess until timed on the device.
    "gpu": replace(
        Budget(30000, 30000, 6000, 64, 6000, 64, 8000, 64, 1e-3, t2i_steps=3000, precondition_text=True),
        repair_cases=6000,
        repair_steps=2000,
    ),
}
# The shipped model: the CPU recipe, then phases 3 to 8 of the transformer on 60k fresh cases (9000 + 7000 + 7000 +
# 6000 + 5500 + 5500 steps), the grown vision tower, the chat phase (3000 steps; a second cycle lowered the pipeline's
# scores and not the chat's: docs/BENCHMARKS.md) and an answering adapter trained on 36k understanding cases
# besides reflection, with two further cycles, two late rounds on the final model's drawings, three cycles on
# understanding alone, a settling round, two dot cycles, two re-settling rounds and three counting rounds, and last
# the repair cycle on 6000 of its own drawings (2000 steps; ~18 h on 2 cores).
BUDGETS["cpu-long"] = replace(
    BUDGETS["cpu"],
    extra_per_task=15000,
    extra_steps=(9000, 7000, 7000, 6000, 5500, 5500),
    chat_steps=(3000,),
    vision_steps=2500,
    reflection_steps=2000,
    answer_steps=(3000, 3000),
    redraw_steps=(2000, 2000),
    understanding_steps=(1500, 3000, 4000),
    settle_steps=2000,
    dot_steps=((1500, 1.0), (2000, 0.5)),
    resettle_steps=(2000, 3000),
    count_steps=(2000, 2000, 2000),
    repair_cases=6000,
    repair_steps=2000,
    precondition_text=False,  # the shipped transformer was trained before the option existed
)
EXTRA_SEED_OFFSET = 10**6  # phase 3's training seeds (the first data stage uses those from 0)
SHIFT_FACTOR = 3.0  # the fixed time shift of training and sampling (see stage_transformer)
SAMPLING = {
    "num_inference_steps": 16,
    "text_guidance_scale": 3.0,
    "image_guidance_scale": 1.5,
    "height": 64,
    "width": 64,
    # Reflection draws each repair 8 times and keeps the one the MLLM judges best (OmniGen2ChatPipeline.reflect):
    # with one, three repairs gained +0.043 on held-out text-to-image, with 8 +0.064 over four noise seeds (keeping
    # the best-scored match), and +0.079 after the repair cycle (docs/BENCHMARKS.md).
    "reflect_candidates": 8,
}


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


def stage_data(out: Path, b: Budget) -> Path:
    import os

    from .dataset import write_dataset

    workers = max(1, (os.cpu_count() or 1) - 1)
    if not (out / "data" / "mix.yml").is_file():
        write_dataset(out / "data", b.n_per_task, tasks=("t2i", "edit", "ic"), workers=workers)
    for task, n in (("understanding", b.n_understanding), ("reflection", b.n_understanding // 2)):
        if not (out / "data" / task / "records.jsonl").is_file():
            write_dataset(out / "data", n, tasks=(task,), workers=workers)
    more = out / "data" / "more"
    if b.extra_per_task and not (more / "mix.yml").is_file():  # mix.yml is written last: the marker of completion
        write_dataset(more, 2 * b.extra_per_task, EXTRA_SEED_OFFSET, tasks=("t2i",), workers=workers)
        write_dataset(more, 2 * b.extra_per_task, EXTRA_SEED_OFFSET, tasks=("understanding",), workers=workers)
        write_dataset(more, b.extra_per_task, EXTRA_SEED_OFFSET, tasks=("edit", "ic"), workers=workers)
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


def stage_vae(out: Path, b: Budget):
    from diffusers import AutoencoderKL

    from .mini import VAE_CONFIG
    from .pretrain import train_vae, vae_reconstruction_error

    path = out / "vae"
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    train_vae(vae, lambda s: _scene_batch(s, b.vae_batch), b.vae_steps, lr=1e-3)
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


def stage_mllm(out: Path, data: Path, tokenizer, b: Budget):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .mini import mllm_config
    from .pretrain import train_mllm

    path = out / "mllm"
    if (path / "config.json").is_file():
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    batcher, batch = _mllm_setup(data, tokenizer, b.mllm_batch)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(mllm_config(tokenizer))
    train_mllm(model, batch, b.mllm_steps)
    model.save_pretrained(path)
    report = mllm_report(model, batcher)
    (path / "understanding.json").write_text(json.dumps(report, indent=2))
    logger.info("mllm on held-out cases: %s", report)
    return model


def stage_vision(out: Path, data: Path, tokenizer, b: Budget, final: Path) -> Path:
    """Understanding needs a larger vision tower than the first MLLM stage trained; the language model, which
    conditions the transformer on text-only prompts, stays frozen, so the trained transformer keeps working.
    The new MLLM (OUT/mllm_vision) replaces FINAL/mllm."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .pretrain import new_vision_tower, train_mllm

    path = out / "mllm_vision"
    if (path / "config.json").is_file():
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    else:
        batcher, batch = _mllm_setup(data, tokenizer, b.mllm_batch)
        torch.manual_seed(1)
        model = new_vision_tower(
            Qwen2_5_VLForConditionalGeneration.from_pretrained(final / "mllm"), b.vision_depth, b.vision_hidden
        )
        train_mllm(model, batch, b.vision_steps)
        model.save_pretrained(path)
        report = mllm_report(model, batcher)
        (path / "understanding.json").write_text(json.dumps(report, indent=2))
        logger.info("mllm with the new vision tower on held-out cases: %s", report)
    model.save_pretrained(final / "mllm")
    return final


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


def _transformer_config(pretrained: Path, mix: Path, run: Path, b: Budget, steps: int, schedule: str) -> dict:
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
            "batch_size": b.transformer_batch,
            "lr": b.transformer_lr,
            "warmup_steps": min(250, steps // 10),
            "schedule": schedule,
            "min_lr_ratio": 0.05,
            "ema_decay": 0.999 if steps > 1000 else 0.9,
            "precondition_text": b.precondition_text,
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
    Trainer(config).fit(resume="latest")


# The phases of the transformer, in run order: (run folder, data mix file, [(records, ratio)]). Phase 1 is
# text-to-image only, as the paper's first stage: in the full mix from the start, the reference images explain
# most of the edit and in-context targets and the text was hardly learned (docs/BENCHMARKS.md). Phase 2 is the
# full mix, half of it still text-to-image (drawing from the text alone is the slowest to learn). Phase 3
# (budgets with extra_steps) continues the mix on fresh cases, a quarter of it the first data again; phases 4, 5,
# ... repeat it (phase_run).
# Each task's share as in phase 2, split over its first and fresh cases by their numbers (1 : 3, 1 : 2).
MORE_MIX = [
    ("t2i", 0.125),
    ("more/t2i", 0.375),
    ("edit", 0.0833),
    ("more/edit", 0.1667),
    ("ic", 0.0833),
    ("more/ic", 0.1667),
]
PHASES = (
    ("transformer_t2i", "t2i_only.yml", [("t2i", 1.0)]),
    ("transformer_run", "phase2.yml", [("t2i", 0.5), ("edit", 0.25), ("ic", 0.25)]),
    ("transformer_more", "phase3.yml", MORE_MIX),
)


def phase_run(phase: int) -> tuple[str, str]:
    """(run folder, mix file) of transformer phase ``phase`` (1-based). Phases 4, 5, ... (further extra_steps
    entries) repeat phase 3's cycle on the same mix from the previous phase's EMA: each such warm restart kept
    raising the scores (no sign of overfitting: training cases scored no higher than held-out ones)."""
    if phase <= len(PHASES):
        return PHASES[phase - 1][:2]
    return f"transformer_more{phase - 2}", PHASES[2][1]


def stage_transformer(out: Path, data: Path, b: Budget, base: Path) -> Path:
    """Train the phases the budget asks for, each starting from the previous one's EMA weights; returns the last
    run folder."""
    for _, name, sources in PHASES:  # phases 4, 5, ... reuse phase 3's mix
        mix = [{"path": f"{src}/records.jsonl", "ratio": r} for src, r in sources]
        (data / name).write_text(yaml.safe_dump({"data": mix}, sort_keys=False))
    (t2i, t2i_mix, _), (mixed, mixed_mix, _) = PHASES[:2]
    init = base
    if b.t2i_steps:
        _train(_transformer_config(base, data / t2i_mix, out / t2i, b, b.t2i_steps, "constant"), out / "t2i_config.yml")
        init = _handoff(out / t2i, out / "t2i_pipeline")
    cfg = _transformer_config(init, data / mixed_mix, out / mixed, b, b.transformer_steps, "cosine")
    _train(cfg, out / "transformer_config.yml")
    last = out / mixed
    for phase, steps in enumerate(b.extra_steps, start=3):
        last = extra_phase(out, data, b, phase, steps, _handoff(last, out / f"phase{phase - 1}_pipeline"))
    return last


def extra_phase(out: Path, data: Path, b: Budget, phase: int, steps: int, init: Path) -> Path:
    """Phase 3, 4, ... of the transformer: a cosine cycle of ``steps`` on the phase-3 mix from ``init``."""
    run, mix = phase_run(phase)
    cfg = _transformer_config(init, data / mix, out / run, b, steps, "cosine")
    cfg["train"].update(lr=b.extra_lr, warmup_steps=min(200, steps // 10))
    _train(cfg, out / f"phase{phase}_config.yml")
    return out / run


# The chat phase's data settings (and the repair cycle's after it): half the texts in the chat form, whose edit and
# in-context samples show their images to the MLLM as a chat turn does.
CHAT_DATA = {"generation_prompt_prob": 0.5, "chat_images": True}


def stage_chat(out: Path, data: Path, b: Budget, final: Path) -> Path:
    """The chat phase (``chat_steps``): the transformer learns the conditioning of a chat turn that shows the
    MLLM its input images, from FINAL (after the vision stage, whose tower those images pass through); a
    generation-pipeline edit conditions on the instruction alone, and without this phase a chat edit drew from
    states the transformer never saw (docs/CHAT.md). Its EMA weights become OUT/final_chat."""
    target = out / "final_chat"
    if not (target / "model_index.json").is_file():
        init = final
        for k, steps in enumerate(b.chat_steps, start=1):
            run = out / f"transformer_chat{k if k > 1 else ''}"
            cfg = _transformer_config(init, data / PHASES[2][1], run, b, steps, "cosine")
            cfg["train"].update(lr=b.extra_lr, warmup_steps=min(200, steps // 10))
            cfg["data"].update(CHAT_DATA)
            _train(cfg, out / f"chat{k}_config.yml")
            init = _handoff(run, target if k == len(b.chat_steps) else out / f"chat{k}_pipeline")
    return target


REPAIR_SEED = 3 * 10**7  # the repair cycle's training prompts (seeds from here, clear of the other stages')


def stage_repair(out: Path, data: Path, b: Budget, final: Path) -> Path:
    """The repair cycle (``repair_steps``): editing examples made of FINAL's own chat drawings of training
    prompts, each with the judge's one-edit fix and the fixed scene rendered as the target
    (:func:`reflection.repair_records`), a ``repair_share`` of the batch beside the chat phase's mix, one cosine
    cycle from FINAL's transformer. The MLLM, its answering adapter and the VAE stay as they are. Writes
    OUT/final_repair."""
    from ..eval.shapesbench import chat_generate
    from ..pipelines import OmniGen2ChatPipeline
    from .reflection import repair_records

    target = out / "final_repair"
    if (target / "model_index.json").is_file():
        return target
    pairs = data / "repair"
    if not (pairs / "records.jsonl").is_file():
        chat = OmniGen2ChatPipeline.from_pretrained(final)
        chat.set_progress_bar_config(disable=True)
        draw = chat_generate(chat, force_draw=True)
        summary = repair_records(lambda p, i, g: draw(p, i, g).value, b.repair_cases, pairs, start=REPAIR_SEED)
        logger.info("repair data: %d records; drawings %s; fixes %s", summary.records, summary.kinds, summary.fixes)
    mix = [{"path": f"{src}/records.jsonl", "ratio": r * (1 - b.repair_share)} for src, r in MORE_MIX]
    mix.append({"path": "repair/records.jsonl", "ratio": b.repair_share})
    (data / "repair.yml").write_text(yaml.safe_dump({"data": mix}, sort_keys=False))
    run = out / "transformer_repair"
    cfg = _transformer_config(final, data / "repair.yml", run, b, b.repair_steps, "cosine")
    # The whitened caption projection whatever the budget's setting (it changes how training steps, not what the
    # model computes): the fixes are mostly recolourings, told apart by colour words the states barely separate.
    cfg["train"].update(lr=b.repair_lr, warmup_steps=min(100, b.repair_steps // 10), precondition_text=True)
    cfg["data"].update(CHAT_DATA)
    _train(cfg, out / "repair_config.yml")
    return _handoff(run, target)


def _handoff(run: Path, pipeline: Path) -> Path:
    """A finished phase's EMA weights as a pipeline directory, where the next phase starts (exported once)."""
    from ..training import export

    if not (pipeline / "model_index.json").is_file():
        export(run, pipeline, weights="ema", sampling_defaults=SAMPLING)
    return pipeline


# The answering adapter's pools, weighted: the model's images the judge passed, those it failed, the synthetic
# reflection cases, the understanding questions, captions of dot-rich scenes, the counting questions among the
# understanding ones (a second draw on them). A settling round weights understanding up; an understanding cycle
# trains on it alone; a dot cycle on it and the dot-rich captions; a counting round weights counting up.
ANSWER_POOLS = (0.2, 0.2, 0.15, 0.45, 0.0, 0.0)
SETTLE_POOLS = (0.15, 0.15, 0.15, 0.55, 0.0, 0.0)
UNDERSTANDING_POOLS = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
DOT_POOLS = (0.0, 0.0, 0.0, 0.5, 0.5, 0.0)
RESETTLE_POOLS = (0.15, 0.15, 0.15, 0.35, 0.2, 0.0)
RESETTLE_LATE_POOLS = (0.1, 0.1, 0.15, 0.45, 0.2, 0.0)
COUNT_POOLS = (0.1, 0.1, 0.15, 0.3, 0.15, 0.2)
RESETTLE_AUX = 0.5  # the cell probe's weight in the re-settling and counting rounds
COUNT_AUX = 0.2  # the weight of the probe's count term (a mean squared error of counts) in the counting rounds
DOTTED_CAPTIONS = 8000  # training examples of tasks.dotted_captions, from seed DOTTED_SEED
DOTTED_SEED = 2 * 10**6


def _answer_examples(
    out: Path, rounds: list[Path], weights: tuple[float, ...] = ANSWER_POOLS
) -> list[tuple[list, float]]:
    """The answering adapter's pools and their weights: the model's images the judge passed, those it failed
    (with the judge's problem and fix), the synthetic reflection cases of the training data (rendered mistakes),
    the understanding questions (the first data's and phase 3's), captions of dot-rich scenes and the counting
    questions among the understanding ones; pools of weight 0 are left out."""
    from .reflection import read_records
    from .tasks import dotted_captions

    w_match, w_mismatch, w_synthetic, w_understanding, w_dotted, w_count = weights
    # A pool of weight 0 is not read at all (an understanding cycle would otherwise load every round's images).
    model = [ex for r in rounds for ex in read_records(r / "records.jsonl")] if w_match or w_mismatch else []
    match = [ex for ex in model if ex[2].startswith("the image matches")]
    mismatch = [ex for ex in model if not ex[2].startswith("the image matches")]
    synthetic = read_records(out / "data" / "reflection" / "records.jsonl") if w_synthetic else []
    understanding = [
        ex
        for path in (out / "data" / "understanding", out / "data" / "more" / "understanding")
        if (w_understanding or w_count) and (path / "records.jsonl").is_file()
        for ex in read_records(path / "records.jsonl")
    ]
    dotted = dotted_captions(DOTTED_CAPTIONS, DOTTED_SEED) if w_dotted else []
    counting = [ex for ex in understanding if ex[1].startswith("how many")]
    pools = zip((match, mismatch, synthetic, understanding, dotted, counting), weights, strict=True)
    return [(p, w) for p, w in pools if p and w > 0]


def stage_reflection(out: Path, final: Path, b: Budget, rounds: int = 2) -> Path:
    """The paper's reflection data, twice: generate images with the model on training prompts, label them with
    the judge (standing in for the external VLM: a verdict, and for a mismatch its problem and one fixing edit),
    train the MLLM's answering adapter (stored as ``mllm_reflection/``) on them with the understanding questions;
    round 2 labels the images of the round-1 model after one reflection round (judged and repaired by itself),
    and continues training the adapter; each ``answer_steps`` entry continues it once more on the same pools,
    each ``redraw_steps`` entry is one more round on the drawings of chat turns (what a reflection judges), each
    ``understanding_steps`` entry a cycle on the understanding questions alone, ``settle_steps`` a round of new
    drawings with understanding weighted up, each ``dot_steps`` entry a cycle that teaches the adapter to read
    dots (dot-rich captions and the cell probe), and each ``resettle_steps`` entry a round on the settling
    round's drawings again, each ``count_steps`` entry once more with counting weighted up and the probe's count
    term on. Every cycle is saved as OUT/final_reflect_round{i}, and a run
    continues after the last saved one. Writes OUT/final_reflect."""
    import random

    from ..eval.shapesbench import chat_generate, pipeline_generate
    from ..loading import load_reflection_adapter
    from ..pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline
    from .pretrain import UnderstandingBatcher
    from .reflection import reflection_records, train_reflection_adapter
    from .tasks import IMAGE_TASKS

    target = out / "final_reflect"
    if (target / "model_index.json").is_file():
        return target
    source, adapter, done = final, None, []
    # (reflection round or None, steps, pool weights, cell-probe weight, count-term weight) per cycle; rounds
    # after the first `rounds` are late rounds (the re-settling round reads the settling round's drawings again).
    cycles = [(r, b.reflection_steps, ANSWER_POOLS, 0.0, 0.0) for r in range(1, rounds + 1)]
    cycles += [(None, s, ANSWER_POOLS, 0.0, 0.0) for s in b.answer_steps]
    cycles += [(rounds + 1 + k, s, ANSWER_POOLS, 0.0, 0.0) for k, s in enumerate(b.redraw_steps)]
    cycles += [(None, s, UNDERSTANDING_POOLS, 0.0, 0.0) for s in b.understanding_steps]
    settle_round = rounds + 1 + len(b.redraw_steps)
    if b.settle_steps:
        cycles.append((settle_round, b.settle_steps, SETTLE_POOLS, 0.0, 0.0))
    cycles += [(None, s, DOT_POOLS, aux, 0.0) for s, aux in b.dot_steps]
    if (b.resettle_steps or b.count_steps) and not b.settle_steps:
        raise ValueError("resettle_steps and count_steps read the settling round's drawings: they need settle_steps")
    cycles += [
        (settle_round, s, RESETTLE_POOLS if k == 0 else RESETTLE_LATE_POOLS, RESETTLE_AUX, 0.0)
        for k, s in enumerate(b.resettle_steps)
    ]
    cycles += [(settle_round, s, COUNT_POOLS, RESETTLE_AUX, COUNT_AUX) for s in b.count_steps]
    # An interrupted run continues after its last saved cycle, from that cycle's adapter.
    last = max(
        (i for i in range(1, len(cycles) + 1) if (out / f"final_reflect_round{i}/model_index.json").is_file()),
        default=0,
    )
    if last:
        source = out / f"final_reflect_round{last}"
        adapter = load_reflection_adapter(source)
    # Loaded once: each cycle trains a copy of this MLLM and saves it with that cycle's adapter.
    pipe = OmniGen2Pipeline.from_pretrained(final)
    pipe.reflection_adapter = None  # a clean MLLM: no adapter layers (not even those of a final that has one)
    plain = OmniGen2ChatPipeline(pipe)  # only for its tokenizer and image processor (the same in every round)
    batcher = UnderstandingBatcher(plain.tokenizer, plain.vision_processor)
    for i, (r, steps, weights, aux, count_aux) in enumerate(cycles, start=1):
        late_round = r is not None and r > rounds
        if i <= last:
            done += [out / f"reflection_round{r}"] if r is not None else []
            continue
        if r is not None:  # a reflection round: new images of the model so far, labelled by the judge
            data = out / f"reflection_round{r}"
            if not (data / "records.jsonl").is_file():
                chat = OmniGen2ChatPipeline.from_pretrained(source)
                chat.set_progress_bar_config(disable=True)
                # A late round labels the chat's own drawing, the one a reflection judges: a chat turn conditions
                # it on the conversation, and draws edits and in-context cases differently from the pipeline.
                draw = chat_generate(chat, force_draw=True) if late_round else pipeline_generate(chat.pipe)

                def generate(prompt, inputs, g, draw=draw, chat=chat, r=r, late_round=late_round):
                    image = draw(prompt, inputs, g)
                    if late_round:
                        return image.value  # the drawing (force_draw: the answer is always <|img|>)
                    if r == 1:
                        return image
                    rounds_ = chat.reflect(image, prompt, 1, generator=g, height=64, width=64)
                    return rounds_[0].image or image  # the repaired image when the model found a problem

                summary = reflection_records(
                    generate, b.reflection_cases, data, start=(r + 1) * 10**6, tasks=IMAGE_TASKS
                )
                logger.info("reflection round %d data: %s; fixes %s", r, summary.kinds, summary.fixes)
            done.append(data)
        pools = _answer_examples(out, done[-1:] if late_round else done, weights)
        rng = random.Random(i)
        n_examples = max(20000, 32 * steps)  # about one visit each
        examples = [rng.choice(rng.choices([p for p, _ in pools], [w for _, w in pools])[0]) for _ in range(n_examples)]
        adapter, _ = train_reflection_adapter(
            pipe.mllm, batcher, examples, steps, adapter=adapter, cell_aux=aux, count_aux=count_aux
        )
        pipe.reflection_adapter = adapter
        source = out / f"final_reflect_round{i}"
        pipe.save_pretrained(source)
    shutil.copytree(source, target)
    return target


def learning_curve(out: Path, n: int = 60, tasks: tuple[str, ...] = ("t2i", "edit", "ic")) -> list[dict]:
    """ShapesBench (``n`` held-out cases per task) of every kept checkpoint of the transformer run, with the
    EMA weights and the recommended sampling settings; written to OUT/learning_curve.json."""
    import tempfile

    from ..eval.shapesbench import evaluate_model
    from ..training import export
    from ..training.checkpoint import checkpoint_dirs

    path = out / "learning_curve.json"
    curve = json.loads(path.read_text()) if path.is_file() else []
    done = {row["step"] for row in curve}
    checkpoints, offset = [], 0
    phase = 1
    while phase <= len(PHASES) or (out / phase_run(phase)[0]).is_dir():  # steps counted over all phases
        run = phase_run(phase)[0]
        phase += 1
        steps = [(ck, int(ck.name.split("-")[1])) for ck in checkpoint_dirs(out / run)] if (out / run).is_dir() else []
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


def run(
    out: Path,
    budget: str = "cpu",
    curve: int = 0,
    reflection: bool = True,
    parts: str | None = None,
    precondition_text: bool | None = None,
) -> Path:
    """The recipe's stages in order; each skips when its output exists. ``parts`` (a Shapes pipeline) supplies
    the tokenizer, VAE and MLLM (and the answering adapter) so only the transformer trains (stage_parts);
    ``precondition_text`` overrides the budget's."""
    from .bundle import assemble

    b = BUDGETS[budget]
    if precondition_text is not None:
        b = replace(b, precondition_text=precondition_text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps({"budget": budget, "parts": parts, **asdict(b)}, indent=2))
    data = stage_data(out, b)
    src = stage_parts(out, parts) if parts else None
    tokenizer = stage_tokenizer(out, data)
    vae = stage_vae(out, b)
    mllm = stage_mllm(out, data, tokenizer, b)
    base = out / "base"
    if not (base / "model_index.json").is_file():
        assemble(base, tokenizer, mllm, vae, sampling_defaults=SAMPLING, shift_factor=SHIFT_FACTOR)
    run_dir = stage_transformer(out, data, b, base)
    from ..training import export

    final = export(run_dir, out / "final", weights="ema", sampling_defaults=SAMPLING)
    logger.info("bundled model written to %s", final)
    if curve:
        learning_curve(out, curve)
    if b.vision_steps and src is None:  # reused parts keep their tower, which their adapter was trained with
        stage_vision(out, data, tokenizer, b, final)
    if b.chat_steps:
        final = stage_chat(out, data, b, final)
    if src is not None:
        from ..loading import REFLECTION_ADAPTER_DIR

        adapter = src / REFLECTION_ADAPTER_DIR
        if adapter.is_dir() and not (final / REFLECTION_ADAPTER_DIR).is_dir():
            shutil.copytree(adapter, final / REFLECTION_ADAPTER_DIR)
    elif reflection:
        final = stage_reflection(out, final, b)
        logger.info("with the reflection adapter: %s", final)
    else:
        return final
    if b.repair_steps:
        final = stage_repair(out, data, b, final)
        logger.info("after the repair cycle: %s", final)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omnigen2.shapes.recipe", description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    p.add_argument("--out", default="runs/shapes")
    p.add_argument(
        "--curve", type=int, default=0, metavar="N", help="also score every kept checkpoint on N cases per task"
    )
    p.add_argument("--no-reflection", action="store_true", help="stop after the export (no reflection stage)")
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
