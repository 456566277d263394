"""``omnigen2 batch RECORDS.jsonl -o OUT/``: declared here, registered by ``omnigen2.cli.build_parser``.

``add_parser`` imports nothing heavy: torch loads when the command runs. The sampling flags and the model flags are
``generate``'s own definitions, copied from its parser, so a flag means the same on both commands.
"""

from __future__ import annotations

import argparse
import time

from ..cli import POSITIVE_INT
from .records import LIMIT_FIELDS, RUN_FIELDS, SAMPLING_FIELDS


def _generate_parser() -> argparse.ArgumentParser:
    from .. import cli

    sub = cli._Parser(add_help=False).add_subparsers()
    cli._add_generate(sub)
    return sub.choices["generate"]


def _copy_flag(dst: argparse._ActionsContainer, action: argparse.Action, help_prefix: str = "") -> None:
    """Declare ``action`` (a flag of another parser) on ``dst``, through the public ``add_argument``."""
    kwargs = {"dest": action.dest, "default": action.default, "help": help_prefix + (action.help or "")}
    if action.nargs == 0:  # a switch
        kwargs["action"] = "store_true" if action.const is True else "store_false"
    else:
        kwargs.update(type=action.type, nargs=action.nargs, choices=action.choices, metavar=action.metavar)
        if action.nargs == "?":
            kwargs["const"] = action.const
    dst.add_argument(*action.option_strings, **kwargs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch",
        help="generate one image per record of a JSON Lines file, resumably, on one or many processes",
        description='Generate OUT/ID.png for each record of RECORDS.jsonl ({"id", "prompt", "input_images", '
        '"seed", "height", "width", ...any sampling flag of generate, by its dest name}) and write '
        "OUT/manifest.jsonl. Outputs that exist are skipped, so a stopped run resumes. Runs on one process, on "
        "every process of `accelerate launch -m omnigen2.cli batch ...`, or with --engine ray on a Ray cluster "
        "(docs/BATCH.md).",
    )
    p.add_argument("records", help="JSON Lines file, one record per line; input image paths are relative to it")
    p.add_argument("-o", "--out", required=True, help="output folder: ID.png per record and manifest.jsonl")
    p.add_argument(
        "--engine",
        choices=["accelerate", "ray"],
        default="accelerate",
        help="accelerate: this process, or each process of an accelerate launch; ray: a Ray Data pipeline",
    )
    actions = {a.dest: a for a in _generate_parser()._actions}
    run = p.add_argument_group("the model, loaded once per process (or Ray actor)")
    for name in RUN_FIELDS:
        _copy_flag(run, actions[name])
    sampling = p.add_argument_group("sampling: the default of every record that leaves the field out")
    for name in SAMPLING_FIELDS:
        _copy_flag(sampling, actions[name])
    limits = p.add_argument_group("limits (a record beyond one is refused while the records are read)")
    for name in LIMIT_FIELDS:
        _copy_flag(limits, actions[f"limit_{name}"])
    ray = p.add_argument_group("--engine ray")
    ray.add_argument(
        "--actors",
        type=POSITIVE_INT,
        default=None,
        help="pipeline actors, one model each (default: one per GPU of the cluster; 1 without GPUs)",
    )
    ray.add_argument("--batch-size", type=POSITIVE_INT, default=1, help="records per map_batches call of an actor")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="cluster to join, e.g. auto (default: $RAY_ADDRESS, else a new Ray instance on this machine)",
    )
    p.set_defaults(func=cmd_batch)
    return p


def cmd_batch(args) -> int:
    from ..cli import DEFAULT_MODEL
    from ..limits import Limits
    from .records import check_defaults, field_specs, parse_records
    from .runner import BatchOptions

    start = time.perf_counter()
    specs = field_specs(_generate_parser())
    defaults = {name: getattr(args, name) for name in SAMPLING_FIELDS}
    if defaults["cfg_range"] is not None:
        defaults["cfg_range"] = list(defaults["cfg_range"])
    limits = {name: getattr(args, f"limit_{name}") for name in LIMIT_FIELDS}
    check_defaults(specs, defaults, Limits(**limits))
    opts = BatchOptions(
        records=args.records,
        out=args.out,
        model=args.model or DEFAULT_MODEL,
        dtype=args.dtype,
        device=args.device,
        allow_pickle=args.allow_pickle,
        defaults=defaults,
        limits=limits,
    )
    records, errors = parse_records(args.records, specs, defaults, Limits(**limits))
    if args.engine == "ray":
        from .ray_engine import run_ray

        return run_ray(
            opts, records, errors, start, actors=args.actors, batch_size=args.batch_size, address=args.ray_address
        )
    from .runner import run_local

    return run_local(opts, records, errors, start)
