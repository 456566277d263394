"""``omnigen2`` command line: ``omnigen2 generate PROMPT [-i IMAGE ...] [options]``, ``omnigen2 chat PROMPT ...``.

One command covers text-to-image (no ``-i``), instruction editing (one ``-i``) and in-context generation
(several ``-i``), as in the original ``inference.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from .limits import DESCRIPTIONS, FLAGS, Limits

DEFAULT_MODEL = "builtin:shapes"
# -o's extension picks the format; the generation settings go into each file (``image_metadata``).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class Number:
    """An argparse ``type`` for an int or a finite float in a range. ``check`` applies the same rule to a value
    that did not come from the command line (``omnigen2 batch`` records), so a flag and a record field agree."""

    def __init__(self, kind: type, least=None, most=None, above=None, rule: str | None = None):
        self.kind, self.least, self.most, self.above = kind, least, most, above
        self.__name__ = "integer" if kind is int else "number"  # argparse names the type in its messages
        parts = [f">= {least}" if least is not None else "", f"> {above}" if above is not None else ""]
        parts.append(f"<= {most}" if most is not None else "")
        self.rule = rule or " and ".join(p for p in parts if p)

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{'an integer' if self.kind is int else 'a number'} expected, got {text!r}"
            ) from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text!r}")
        return value

    def problem(self, value) -> str | None:
        """What ``value`` (already of ``kind``) breaks, or None."""
        if self.kind is float and not math.isfinite(value):
            return f"a finite number{' ' + self.rule if self.rule else ''}"
        low = self.least is not None and value < self.least
        if low or (self.above is not None and value <= self.above) or (self.most is not None and value > self.most):
            return self.rule
        return None


POSITIVE_INT = Number(int, least=1)
COUNT = Number(int, least=0)
NONNEG_FLOAT = Number(float, least=0)
FRACTION = Number(float, least=0, most=1)
SEED = Number(int, least=0, most=2**64 - 1, rule="in [0, 2**64)")  # torch's manual_seed takes < 2**64
POSITIVE_FLOAT = Number(float, above=0)
PORT = Number(int, least=0, most=65535)  # 0: any free port


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help says its default itself (it must where the
    default is None: what "unset" means differs per option). Switches, positionals and empty lists get none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, argparse.SUPPRESS, []):
            return text
        if action.default is False or action.default is True:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows the defaults and whose usage errors are one line, as ``main``'s;
    subcommands inherit it (add_subparsers' parser_class)."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(2, f"omnigen2: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _add_model_and_sampling(p, image_help: str) -> None:
    """The arguments ``generate`` and ``chat`` share: input images, the model, seed, size, steps, guidance and
    where it runs."""
    p.add_argument("-i", "--input-image", dest="images", action="append", default=[], metavar="IMAGE", help=image_help)
    p.add_argument("--model", default=None, help=f"pipeline directory or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="denoising steps (default: the model's, else 28)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed")
    size = "(default: the model's, else 1024 for the released VAE; with one -i: the input image's, always)"
    p.add_argument("--height", type=POSITIVE_INT, default=None, help=f"image height in pixels {size}")
    p.add_argument("--width", type=POSITIVE_INT, default=None, help=f"image width in pixels {size}")
    p.add_argument(
        "--text-guidance", type=NONNEG_FLOAT, default=None, help="text guidance scale (default: the model's, else 4)"
    )
    p.add_argument(
        "--image-guidance", type=NONNEG_FLOAT, default=None, help="image guidance scale (default: the model's, else 1)"
    )
    p.add_argument("--negative-prompt", default=None, help='negative prompt of text guidance (default: "")')
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    limits = p.add_argument_group("limits (a request beyond one is refused before the model loads)")
    for name, flag in FLAGS.items():
        default = getattr(Limits(), name)
        limits.add_argument(
            flag, dest=f"limit_{name}", type=POSITIVE_INT, default=default, metavar="N", help=DESCRIPTIONS[name]
        )


def _limits(args) -> Limits:
    """The command line's bounds, checked against what it asks for before anything loads (the pipeline checks
    again, with the model's defaults filled in)."""
    limits = Limits(**{name: getattr(args, f"limit_{name}") for name in FLAGS})
    if args.steps is not None:
        limits.check("steps", args.steps, f"--steps {args.steps}")
    if args.height is not None and args.width is not None:
        pixels = args.height * args.width
        limits.check("output_pixels", pixels, f"--height {args.height} x --width {args.width} = {pixels} pixels")
    if getattr(args, "num_images", None) is not None:
        limits.check("images_per_prompt", args.num_images, f"--num-images {args.num_images}")
    if getattr(args, "max_sequence_length", None) is not None:
        limits.check("prompt_tokens", args.max_sequence_length, f"--max-sequence-length {args.max_sequence_length}")
    for name, dest, flag in (("reflect", "reflect", "--reflect"), ("new_tokens", "max_new_tokens", "--max-new-tokens")):
        if getattr(args, dest, None) is not None:
            limits.check(name, getattr(args, dest), f"{flag} {getattr(args, dest)}")
    if getattr(args, "reflect_candidates", None) is not None:
        limits.check("images_per_prompt", args.reflect_candidates, f"--reflect-candidates {args.reflect_candidates}")
    return limits


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="text-to-image, editing or in-context generation",
        description="Generate images. Without -i: text-to-image; with one -i: editing; "
        "with several: in-context generation.",
    )
    p.add_argument("prompt", help="the instruction")
    _add_model_and_sampling(p, "input (reference) image; repeat for several (at most 5; default: none)")
    p.add_argument(
        "-o",
        "--output",
        default="omnigen2.png",
        help="output file, .png, .jpg/.jpeg or .webp (the extension picks the format; none: .png), or an existing "
        "folder (FOLDER/omnigen2.png); with several images: OUT_0.png, OUT_1.png, ... and a grid OUT_grid.png. "
        "Existing files are kept unless --overwrite",
    )
    p.add_argument(
        "--cfg-range",
        type=FRACTION,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("A", "B"),
        help="apply guidance for steps whose fraction i/N lies in [A, B] (default: 0 1, every step)",
    )
    p.add_argument("--num-images", type=POSITIVE_INT, default=1, help="images to generate")
    p.add_argument(
        "--scheduler", choices=["euler", "dpmsolver++"], default=None, help="sampler (default: the model's, euler)"
    )
    p.add_argument(
        "--teacache",
        type=NONNEG_FLOAT,
        nargs="?",
        const=0.05,
        default=None,
        metavar="T",
        help="enable TeaCache with threshold T (0.05 when T is left out; default: off)",
    )
    p.add_argument("--taylorseer", action="store_true", help="enable TaylorSeer")
    p.add_argument(
        "--max-pixels", type=POSITIVE_INT, default=1024 * 1024, help="pixel budget of input and output images"
    )
    p.add_argument("--max-input-side", type=POSITIVE_INT, default=1024, help="longest side of an input image")
    p.add_argument(
        "--max-sequence-length", type=POSITIVE_INT, default=1024, help="prompt tokens kept (longer: truncated)"
    )
    p.add_argument(
        "--no-align-res",
        dest="align_res",
        action="store_false",
        help="with one -i, generate at --height x --width instead of the input image's size (default: its size)",
    )
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="one chat turn: a text answer, or an image when the MLLM decides to draw",
        description="The MLLM answers PROMPT (about the -i images) in text, or draws an image when it emits <|img|> "
        "(docs/CHAT.md). With --reflect N it then judges the drawing and repairs it up to N times.",
    )
    p.add_argument("prompt", help="the message")
    _add_model_and_sampling(
        p, "input image, shown to the MLLM and used as a reference; repeat for several (at most 5; default: none)"
    )
    p.add_argument(
        "-o",
        "--output",
        default="chat",
        help="output prefix (OUT.png, and OUT_round0.png, OUT_round1.png, ... for the versions reflection "
        "went through; OUT.jpg or OUT.webp for those formats) or an existing directory (DIR/chat.png, ...); "
        "default: chat",
    )
    p.add_argument("--reflect", type=COUNT, default=0, metavar="N", help="repairs after drawing, each judged")
    p.add_argument(
        "--reflect-candidates",
        type=POSITIVE_INT,
        default=None,
        metavar="K",
        help="repairs drawn per reflection round, the MLLM keeping the one it judges best (default: the model's)",
    )
    p.add_argument("--max-new-tokens", type=COUNT, default=256, help="longest answer in tokens")
    p.add_argument("--force-image", action="store_true", help="start the answer with <|img|>: always draw")
    p.add_argument("--temperature", type=NONNEG_FLOAT, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument(
        "--top-p",
        type=Number(float, above=0, most=1),
        default=1.0,
        help="nucleus sampling threshold (with --temperature)",
    )
    p.set_defaults(func=cmd_chat)


def _load_quietly(cls, model: str, dtype, device, allow_pickle: bool):
    """``cls.from_pretrained`` without the libraries' per-component loading bars on stderr: the command reports
    the load in one line, and an error after loading stays the only line on stderr."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(model, torch_dtype=dtype, device=device, allow_pickle=allow_pickle)
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def _device_dtype_and_images(args):
    """What ``generate`` and ``chat`` check before loading a model: device, dtype and the input images (at most
    5, each readable), so that bad arguments fail before the slow part."""
    import torch

    from .errors import LimitError
    from .images import load_image
    from .limits import MAX_INPUT_IMAGES
    from .loading import parse_device, parse_dtype

    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(args.images) > MAX_INPUT_IMAGES:
        raise LimitError(f"{len(args.images)} input images given; OmniGen2 takes at most {MAX_INPUT_IMAGES}")
    return device, dtype, [load_image(p) for p in args.images]


def cmd_chat(args) -> int:
    import torch

    from .pipelines import OmniGen2ChatPipeline

    limits = _limits(args)
    base = _chat_base(args.output)
    versions = [base.with_name(f"{base.stem}_round{k}{base.suffix}") for k in range(args.reflect + 1)]
    check_outputs([base, *versions] if args.reflect else [base], args.overwrite)
    device, dtype, images = _device_dtype_and_images(args)
    model = args.model or DEFAULT_MODEL

    chat = _load_quietly(OmniGen2ChatPipeline, model, dtype, device, args.allow_pickle)
    chat.pipe.limits = limits
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = chat(
        args.prompt,
        input_images=images or None,
        reflect=args.reflect,
        reflect_candidates=args.reflect_candidates,
        generator=generator,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        text_guidance_scale=args.text_guidance,
        image_guidance_scale=args.image_guidance,
        negative_prompt=args.negative_prompt,
        max_new_tokens=args.max_new_tokens,
        assistant_prefix="<|img|>" if args.force_image else "",
        temperature=args.temperature,
        top_p=args.top_p,
    )
    print(f"answer: {out.text}")
    for k, r in enumerate(out.rounds, 1):
        note = f'; edited with "{r.fix}"' if r.image is not None else ""
        if r.candidates:
            note += f", the MLLM's choice of {len(r.candidates)} drawn (candidate {r.candidates.index(r.image) + 1})"
        print(f"reflection {k}: {r.answer!r} ({r.verdict}{note})")
    if any(r.image is not None for r in out.rounds):
        print(f"kept: repair {out.kept}" if out.kept else "kept: the drawing (no repair was judged a match)")
    if not out.images:
        return 0
    params = {
        "prompt": args.prompt,
        "input_images": args.images,
        "model": str(model),
        "seed": args.seed,
        "steps": args.steps,
        "reflect": args.reflect,
        "reflect_candidates": args.reflect_candidates,
        "answer": out.text,
        "defaults_from_checkpoint": chat.pipe.sampling_defaults,
    }
    written = []
    if any(r.image is not None for r in out.rounds):  # every version the reflection went through
        drawn = [out.rounds[0].judged, *(r.image for r in out.rounds if r.image is not None)]
        for k, im in enumerate(drawn):
            written.append(versions[k])
            save_image(im, versions[k], {**params, "round": k}, overwrite=args.overwrite)
    written.append(base)
    save_image(out.images[0], base, params, overwrite=args.overwrite)
    for p in written:
        print(f"wrote {p}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the denoising loop with random weights",
        description="Time one generation (per-step and end to end, peak memory, FLOP/s) of a transformer size "
        "with random weights; nothing is downloaded.",
    )
    p.add_argument("--preset", choices=["tiny", "mid", "full"], default="mid", help="transformer size")
    p.add_argument(
        "--model",
        default=None,
        help="time a real pipeline (directory, hub id or builtin:NAME) end to end, prompt to PIL image, with its "
        "recommended sampling settings, instead of a random-weight preset (default: none, the preset)",
    )
    p.add_argument("--prompt", default="a red circle above a blue square", help="the prompt of --model's timed call")
    p.add_argument(
        "--height",
        type=POSITIVE_INT,
        default=None,
        help="image height (default: 128 for a preset, the model's with --model)",
    )
    p.add_argument(
        "--width",
        type=POSITIVE_INT,
        default=None,
        help="image width (default: 128 for a preset, the model's with --model)",
    )
    p.add_argument(
        "--num-images",
        type=COUNT,
        default=None,
        help="input (reference) images (default: 1 for a preset, whose 3 guidance branches need one; 0 with --model: "
        "a text-only call)",
    )
    p.add_argument("--branches", type=POSITIVE_INT, choices=[1, 2, 3], default=3, help="guidance branches")
    p.add_argument(
        "--steps",
        type=POSITIVE_INT,
        default=None,
        help="denoising steps (default: 6 for a preset, the model's with --model)",
    )
    p.add_argument("--device", default="cpu", help="where it runs")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and activations")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3, help="timed runs (medians are reported)")
    p.add_argument("--warmup", type=COUNT, default=1, help="untimed runs before them")
    p.add_argument("--sequential-guidance", action="store_true", help="one transformer call per branch")
    p.add_argument(
        "--attention", choices=["auto", "sdpa", "math", "flash_varlen"], default="auto", help="attention backend"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the joint blocks")
    p.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none", help="transformer weights")
    p.add_argument(
        "--offload", choices=["none", "model", "sequential", "group"], default="none", help="CPU offload of weights"
    )
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--write", type=Path, default=None, metavar="MD", help="add the result to this markdown file (default: none)"
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from .bench import BenchConfig, format_result, record_markdown, run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    preset_default = None if args.model else 128
    cfg = BenchConfig(
        preset=args.preset,
        model=args.model,
        prompt=args.prompt,
        height=args.height or preset_default,
        width=args.width or preset_default,
        num_images=args.num_images,
        branches=args.branches,
        steps=args.steps or (None if args.model else 6),
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        batch_guidance=not args.sequential_guidance,
        attention=args.attention,
        compile=args.compile,
        quantize=args.quantize,
        offload=args.offload,
    )
    result = run_bench(cfg)
    print(format_result(result))
    if args.write is not None:
        record_markdown(
            result, args.write, "omnigen2 bench " + " ".join(sys.argv[2:] if args.argv is None else args.argv)
        )
        print(f"wrote {args.write}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the diffusion transformer (full or LoRA)",
        description="Train from a YAML config (docs/TRAINING.md). Run under `accelerate launch` for several processes.",
    )
    p.add_argument("config", help="training config (YAML)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=1e-4 (repeatable; default: none)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="latest|auto|PATH",
        help="continue a run: latest (its newest checkpoint; an error when there is none), auto (the newest "
        "checkpoint if any, else a new run) or a checkpoint folder (default: a new run)",
    )
    p.add_argument(
        "--max-steps",
        type=POSITIVE_INT,
        default=None,
        help="stop after this many more steps, for testing (default: run to the config's train.steps)",
    )
    p.add_argument(
        "--encode-latents",
        action="store_true",
        help="encode every image of the mix into data.latent_cache_file and exit, without training",
    )
    p.set_defaults(func=cmd_train)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a pipeline directory from a training checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("-o", "--output", required=True, help="pipeline directory to write")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the EMA or the trained weights")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the transformer")
    p.add_argument(
        "--dtype", default=None, help="save in this dtype, fp32 | bf16 | fp16 (default: the training config's)"
    )
    p.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recommended sampling setting stored in the checkpoint, e.g. num_inference_steps=20 (repeatable; "
        "default: none)",
    )
    p.set_defaults(func=cmd_export)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="benchmarks (ShapesBench, OmniContext)")
    bench = p.add_subparsers(dest="benchmark", required=True)
    s = bench.add_parser(
        "shapes",
        help="ShapesBench: judged generation, editing, in-context, understanding and reflection cases",
        description="Answer held-out Shapes World cases and score them with the judge (docs/SHAPES.md): image "
        "tasks through the generation pipeline (or, with --reflect N, the chat pipeline), text tasks through "
        "the MLLM. --model oracle gives the right answers (a self-check of the judge).",
    )
    s.add_argument("--model", default=DEFAULT_MODEL, help="pipeline directory, hub id or oracle")
    s.add_argument("--n", type=POSITIVE_INT, default=60, help="cases per task, spread over its categories")
    s.add_argument(
        "--tasks",
        default="t2i,edit,ic",
        help="comma-separated: t2i, edit, ic, understanding, reflection (default: t2i,edit,ic)",
    )
    s.add_argument("--out", default="shapesbench", help="folder for report.json and samples.png")
    s.add_argument("--seed", type=SEED, default=0, help="sampling seed")
    s.add_argument("--steps", type=POSITIVE_INT, default=None, help="denoising steps (default: the model's)")
    s.add_argument(
        "--text-guidance", type=NONNEG_FLOAT, default=None, help="text guidance scale (default: the model's)"
    )
    s.add_argument(
        "--image-guidance", type=NONNEG_FLOAT, default=None, help="image guidance scale (default: the model's)"
    )
    s.add_argument(
        "--categories",
        default=None,
        help="comma-separated: score only these categories of the n cases per task, e.g. place,background "
        "(default: all)",
    )
    s.add_argument(
        "--reflect",
        type=COUNT,
        default=None,
        metavar="N",
        help="draw image cases through the chat pipeline, the MLLM deciding to draw, then N reflection rounds "
        "(0: none) (default: off, the generation pipeline draws them)",
    )
    s.add_argument(
        "--force-draw",
        action="store_true",
        help="with --reflect: start each answer with <|img|> (for an MLLM that never learned to draw by itself)",
    )
    s.add_argument(
        "--reflect-candidates",
        type=POSITIVE_INT,
        default=None,
        metavar="K",
        help="with --reflect: repairs drawn per round, the MLLM keeping the one it judges best (default: the model's)",
    )
    s.add_argument(
        "--max-new-tokens",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="longest chat answer in tokens, for understanding and --reflect (default: the chat's, 256)",
    )
    s.add_argument("--device", default=None, help="cpu | cuda | mps (default: cuda if available)")
    s.set_defaults(func=cmd_eval)
    from .eval.omnicontext.cli import add_parser as _add_omnicontext  # light: no torch, no httpx until it runs

    _add_omnicontext(bench)


def cmd_eval(args) -> int:
    from .eval.shapesbench import evaluate_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = evaluate_model(
        args.model,
        args.n,
        tasks,
        args.out,
        args.seed,
        args.steps,
        args.device,
        reflect=args.reflect,
        force_draw=args.force_draw,
        max_new_tokens=args.max_new_tokens,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        categories=[c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None,
        reflect_candidates=args.reflect_candidates,
    )
    print(report.table())
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'samples.png'}")
    return 0


def cmd_train(args) -> int:
    import logging

    from .training import Trainer, load_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    if args.encode_latents:
        n = trainer.encode_latents()
        if trainer.acc.is_main_process:
            print(f"encoded {n} images; {len(trainer.latent_cache)} posteriors in {cfg.data.latent_cache_file}")
        return 0
    history = trainer.fit(resume=args.resume, max_steps=args.max_steps)
    if trainer.acc.is_main_process and history:
        print(f"trained to step {trainer.step}; last loss {history[-1]['loss']:.5f}; run in {cfg.output.dir}")
    return 0


def cmd_export(args) -> int:

    from .training import export
    from .training.config import apply_overrides

    defaults = apply_overrides({}, args.sampling)  # KEY=VALUE, values read as YAML, as `train --set`
    out = export(
        args.checkpoint,
        args.output,
        weights=args.weights,
        merge_lora=args.merge_lora,
        dtype=args.dtype,
        sampling_defaults=defaults,
    )
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnigen2", description="OmniGen2: unified image generation")
    parser.add_argument("--version", action="version", version=f"omnigen2 {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from .batch.cli import add_parser as _add_batch  # light: torch loads only when `batch` runs

    _add_batch(sub)
    _add_chat(sub)
    _add_train(sub)
    _add_export(sub)
    _add_eval(sub)
    _add_bench(sub)
    from .serving.cli import add_parser as _add_serve  # light: fastapi and torch load only when `serve` runs

    _add_serve(sub)
    from .app.cli import add_parser as _add_app  # light: gradio and torch load only when `app` runs

    _add_app(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _grid(images):
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


def output_paths(output: str, count: int, default_name: str = "omnigen2.png") -> list[Path]:
    """The files ``generate -o OUTPUT`` writes for ``count`` images: OUTPUT itself for one image, else OUT_k.EXT
    for each and the grid OUT_grid.EXT. An existing folder (or a name ending in "/") means a file inside it; no
    extension means .png; any other extension than OUTPUT_FORMATS' is refused, not swapped."""
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)):
        path = path / default_name
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    _output_format(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{k}{path.suffix}") for k in range(count)] + [
        path.with_name(f"{path.stem}_grid{path.suffix}")
    ]


def _chat_base(output: str) -> Path:
    """``chat -o``'s main file: OUT.png for a prefix OUT (the versions add _roundK), DIR/chat.png for a folder."""
    base = Path(output)
    if base.is_dir() or output.endswith(("/", os.sep)):
        base = base / "chat"
    if base.suffix.lower() not in OUTPUT_FORMATS:
        if base.suffix:
            _output_format(base)  # refused: an extension that is no image format
        base = base.with_name(base.name + ".png")
    return base


def _output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"output {str(path)!r}: unknown image extension {path.suffix!r}; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    return fmt


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Before the model loads: each output may be written (not a folder; absent, or ``overwrite``), and the
    folder it goes in can be created and written to (probed with a temporary file, removed at once)."""
    for p in paths:
        if p.is_dir():
            raise IsADirectoryError(f"output {str(p)!r} is a folder; name a file inside it")
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(f"output {shown} exists; pass --overwrite to replace it, or choose another -o")
    for folder in dict.fromkeys(p.parent for p in paths):
        _probe_folder(folder)


def _probe_folder(folder: Path) -> None:
    """Raise OSError naming ``folder`` when files cannot be written there; nothing is created (the nearest
    existing parent is probed for a folder that does not exist yet)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write into {str(folder)!r}: {str(existing)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".omnigen2-probe-")
    except OSError as e:
        raise PermissionError(f"cannot write into {str(folder)!r}: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(probe)


def image_metadata(fmt: str, params: dict) -> dict:
    """``PIL.Image.save`` keywords that keep the generation settings in the file: PNG text chunks
    ("parameters": the settings as JSON, "Software"); for JPEG and WebP the same JSON in EXIF ImageDescription
    (0x010E) and the version in EXIF Software (0x0131). JPEG at quality 95, WebP lossless."""
    text = json.dumps(params, sort_keys=True)  # ASCII (escaped), as EXIF ImageDescription requires
    software = f"omnigen2 {_version()}"
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", text)
        info.add_text("Software", software)
        return {"pnginfo": info}
    from PIL import Image

    exif = Image.Exif()
    exif[0x010E], exif[0x0131] = text, software
    quality = {"quality": 95} if fmt == "JPEG" else {"lossless": True}
    return {"exif": exif.tobytes(), **quality}


def save_image(image, path: Path, params: dict, overwrite: bool = True) -> None:
    """Write ``image`` to ``path`` in the format of its extension, settings included (``image_metadata``):
    through PATH.tmp renamed over PATH, so PATH is complete or untouched, and PATH.tmp never outlives the call."""
    fmt = _output_format(path)
    if not overwrite and path.exists():  # appeared while the images were generated
        raise FileExistsError(f"output {str(path)!r} exists; pass --overwrite to replace it, or choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # the name omnigen2 batch looks for after a killed run
    try:
        image.save(tmp, format=fmt, **image_metadata(fmt, params))
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a failing rename: name the file, not only the errno
        raise OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _save_png(image, path: Path, params: dict) -> None:
    """``save_image`` for callers that always write PNG (omnigen2 batch, the app)."""
    save_image(image, path, params)


def generate_call_kwargs(args, images, generator) -> dict:
    """The pipeline call of ``generate`` for its parsed ``args`` (``omnigen2 batch`` builds the same ``args`` per
    record and calls this, so that its images equal ``generate``'s)."""
    return dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        input_images=images or None,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        text_guidance_scale=args.text_guidance,
        image_guidance_scale=args.image_guidance,
        cfg_range=tuple(args.cfg_range),
        num_images_per_prompt=args.num_images,
        generator=generator,
        scheduler=args.scheduler,
        teacache=args.teacache,
        taylorseer=args.taylorseer or None,
        max_pixels=args.max_pixels,
        max_input_image_side_length=args.max_input_side,
        max_sequence_length=args.max_sequence_length,
        align_res=args.align_res,
    )


def generate_png_params(args, model, pipe, device) -> dict:
    """The settings ``generate`` writes into a PNG's "parameters" text chunk (shared with ``omnigen2 batch``)."""
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "input_images": args.images,
        "model": str(model),
        "seed": args.seed,
        "steps": args.steps,
        "height": args.height,
        "width": args.width,
        "text_guidance": args.text_guidance,
        "image_guidance": args.image_guidance,
        "cfg_range": list(args.cfg_range),
        "scheduler": args.scheduler or type(pipe.scheduler).__name__,
        "teacache": args.teacache,
        "taylorseer": args.taylorseer,
        "align_res": args.align_res,
        "dtype": args.dtype,
        "device": str(device),
        "defaults_from_checkpoint": pipe.sampling_defaults,
    }


def cmd_generate(args) -> int:
    import torch

    from .pipelines import OmniGen2Pipeline

    if args.teacache is not None and args.taylorseer:
        raise ValueError("--teacache and --taylorseer are alternatives; pick one")
    limits = _limits(args)
    paths = output_paths(args.output, args.num_images)
    check_outputs(paths, args.overwrite)  # before the slow part: the files must be writable afterwards
    device, dtype, images = _device_dtype_and_images(args)
    model = args.model or DEFAULT_MODEL

    t0 = time.perf_counter()
    pipe = _load_quietly(OmniGen2Pipeline, model, dtype, device, args.allow_pickle)
    pipe.limits = limits
    load_s = time.perf_counter() - t0
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    out = pipe(**generate_call_kwargs(args, images, generator))
    gen_s = time.perf_counter() - t0
    params = generate_png_params(args, model, pipe, device)
    if len(out.images) == 1:
        save_image(out.images[0], paths[0], params, overwrite=args.overwrite)
    else:
        for k, im in enumerate(out.images):
            save_image(im, paths[k], {**params, "index": k}, overwrite=args.overwrite)
        save_image(_grid(out.images), paths[-1], params, overwrite=args.overwrite)
    size = "x".join(map(str, out.images[0].size))
    print(f"loaded {model} in {load_s:.1f}s; generated {len(out.images)} image(s) of {size} in {gen_s:.1f}s")
    for p in paths:
        print(f"wrote {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv[1:])
    try:
        return args.func(args)
    except DOCUMENTED_ERRORS as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"omnigen2: error: {_one_line(e)}", file=sys.stderr)
        return 2


# What ``main`` reports in one line with exit code 2: omnigen2.errors.OmniGen2Error (a ValueError), ValueError,
# TypeError, OSError (a file that exists, cannot be read or written) and ImportError (a missing extra).
DOCUMENTED_ERRORS = (ValueError, TypeError, OSError, ImportError)


if __name__ == "__main__":
    sys.exit(main())
