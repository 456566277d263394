"""``omnigen2 eval omnicontext``: declared here, registered under ``omnigen2 eval`` by ``omnigen2.cli``.

Importing this module loads nothing heavy; the judge's API key is read from an environment variable (named by
``--judge-api-key-env``), so it never appears on a command line or in a log.
"""

from __future__ import annotations

import argparse
import os

from ...cli import COUNT, NONNEG_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED
from . import HUB_ID


def add_parser(bench) -> argparse.ArgumentParser:
    """Add ``omnicontext`` to the ``eval`` subparsers ``bench``."""
    from .judge import DEFAULT_API_KEY_ENV, JudgeConfig
    from .run import ORIGINAL_NEGATIVE_PROMPT

    jc = JudgeConfig("", "")
    p = bench.add_parser(
        "omnicontext",
        help="OmniContext: in-context generation judged for prompt following and subject consistency",
        description="Generate every OmniContext prompt through `omnigen2 batch` (resumable; under `accelerate "
        "launch -m omnigen2.cli eval omnicontext ...` every GPU takes a share), judge each image for prompt "
        "following (PF) and subject consistency (SC) with an OpenAI-compatible vision chat endpoint, and write "
        "OUT/omnicontext.json and OUT/omnicontext.md (docs/EVAL.md). The generation defaults are the original "
        "evaluation's.",
    )
    p.add_argument("--model", default=None, help="pipeline directory or hub id (default: builtin:shapes)")
    p.add_argument("--data", default=HUB_ID, help="hub dataset id, parquet file or folder, or a data.jsonl folder")
    p.add_argument("--out", required=True, help="output folder (images, judge cache, reports); reruns resume")
    p.add_argument(
        "--samples", type=POSITIVE_INT, default=1, metavar="K", help="seeds per prompt: --seed, --seed + 1, ..."
    )
    p.add_argument("--seed", type=SEED, default=0, help="first seed")
    p.add_argument("--language", default="en", help="instruction_language kept; 'all' keeps every language")
    gen = p.add_argument_group("generation (`omnigen2 batch` flags)")
    gen.add_argument("--steps", type=POSITIVE_INT, default=50, help="denoising steps")
    gen.add_argument("--height", type=POSITIVE_INT, default=1024, help="image height")
    gen.add_argument("--width", type=POSITIVE_INT, default=1024, help="image width")
    gen.add_argument("--text-guidance", type=NONNEG_FLOAT, default=5.0, help="text guidance scale")
    gen.add_argument("--image-guidance", type=NONNEG_FLOAT, default=2.0, help="image guidance scale")
    gen.add_argument(
        "--negative-prompt", default=ORIGINAL_NEGATIVE_PROMPT, help="negative prompt (default: the original's)"
    )
    gen.add_argument(
        "--align-res",
        action="store_true",
        help="with one input image, generate at its size (the original's evaluation turns this off)",
    )
    gen.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    gen.add_argument("--device", default=None, help="cpu | cuda | mps (default: cuda if available)")
    gen.add_argument(
        "--batch-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="another `omnigen2 batch` flag, e.g. --batch-flag=--teacache (repeatable; default: none)",
    )
    judge = p.add_argument_group("the judge")
    judge.add_argument("--judge-url", required=True, help="OpenAI-compatible API base, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", required=True, help="the judge model, e.g. gpt-4.1 (the paper's)")
    judge.add_argument(
        "--judge-api-key-env",
        default=DEFAULT_API_KEY_ENV,
        metavar="VAR",
        help="environment variable holding the API key (unset: no Authorization header)",
    )
    judge.add_argument(
        "--judge-templates", default=None, metavar="FILE", help="rubric JSON file (default: ours, docs/EVAL.md)"
    )
    judge.add_argument("--judge-concurrency", type=POSITIVE_INT, default=jc.concurrency, help="requests in flight")
    judge.add_argument("--judge-timeout", type=POSITIVE_FLOAT, default=jc.timeout, help="seconds per request")
    judge.add_argument("--judge-retries", type=COUNT, default=jc.retries, help="retries on 429, 5xx and timeouts")
    judge.add_argument(
        "--judge-parse-retries", type=COUNT, default=jc.parse_retries, help="more replies asked when one does not parse"
    )
    judge.add_argument("--judge-backoff", type=NONNEG_FLOAT, default=jc.backoff, help="seconds before the first retry")
    p.set_defaults(func=cmd_omnicontext)
    return p


def cmd_omnicontext(args) -> int:
    from ...cli import DEFAULT_MODEL
    from .judge import JudgeConfig
    from .run import EvalOptions, run_omnicontext

    for flag in ("judge_retries", "judge_parse_retries"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    judge = JudgeConfig(
        url=args.judge_url,
        model=args.judge_model,
        api_key=os.environ.get(args.judge_api_key_env) or None,
        concurrency=args.judge_concurrency,
        timeout=args.judge_timeout,
        retries=args.judge_retries,
        parse_retries=args.judge_parse_retries,
        backoff=args.judge_backoff,
    )
    opts = EvalOptions(
        model=args.model or DEFAULT_MODEL,
        data=args.data,
        out=args.out,
        judge=judge,
        templates=args.judge_templates,
        samples=args.samples,
        seed=args.seed,
        language=None if args.language == "all" else args.language,
        steps=args.steps,
        height=args.height,
        width=args.width,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        negative_prompt=args.negative_prompt,
        align_res=args.align_res,
        dtype=args.dtype,
        device=args.device,
        batch_flags=args.batch_flag,
    )
    result = run_omnicontext(opts)
    return 0 if result is None or not result["failures"] else 1
