"""The recipe's budgets: one YAML file each (``NAME.yml`` beside this module, or any path), the stages in the
order the recipe runs them, each with named fields.

A file holds ``stages``, a list whose entries name their kind (``stage: vae``) and give that kind's fields, and
optionally ``precondition_text``. The kinds come in this order (the tokenizer and the base pipeline, which have
no settings, are built between ``mllm`` and the first ``transformer`` phase; the export follows the last one):

    data          once     the training cases
    vae           once     the autoencoder
    mllm          once     the language model and its first vision tower
    transformer   1 or more  the transformer's phases: [mix t2i], mix first, then any number of mix fresh
    vision        at most once  a grown vision tower (the language model frozen)
    chat          any      chat cycles of the transformer
    reflection    any      cycles of the answering adapter (the first one draws with the pipeline)
    repair        at most once  the repair cycle of the transformer

:func:`load_budget` reads a file into :class:`Budget` and names the file, the stage and the field of anything
it cannot use (an unknown, missing or ill-typed field, a stage out of order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import yaml

BUDGETS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Data:
    """The training cases (training seeds only), written once."""

    per_task: int  # cases per image task (text-to-image, editing, in-context)
    understanding: int  # understanding questions; half as many synthetic reflection cases
    # The fresh cases of the `fresh` phases, the chat cycles and the repair cycle (data/more/, seeds from
    # EXTRA_SEED_OFFSET): this many editing and in-context cases, twice as many text-to-image and understanding.
    fresh_per_task: int = 0


@dataclass(frozen=True)
class Vae:
    steps: int
    batch: int


@dataclass(frozen=True)
class Mllm:
    """The MLLM trained from scratch on understanding, reflection and image instructions, then frozen."""

    steps: int
    batch: int


@dataclass(frozen=True)
class Transformer:
    """One phase of the transformer, from the previous phase's EMA weights (the first from the base pipeline)."""

    # The data mix: "t2i" text-to-image only (phase 1, the paper's first stage), "first" the first data's
    # text-to-image, editing and in-context cases (phase 2), "fresh" the same tasks on fresh cases (phases 3, ...).
    mix: Literal["t2i", "first", "fresh"]
    steps: int
    batch: int
    lr: float
    warmup: int  # warm-up steps, at most a tenth of the phase
    schedule: Literal["constant", "cosine"] = "cosine"


@dataclass(frozen=True)
class Vision:
    """A grown vision tower trained for understanding with the language model frozen (the transformer's
    conditioning, text-only, is unchanged); it replaces the final pipeline's."""

    steps: int
    batch: int
    depth: int
    hidden: int


@dataclass(frozen=True)
class Chat:
    """A cosine cycle of the transformer on the fresh mix with half the texts in the chat form, whose edit and
    in-context samples show their images to the final MLLM."""

    steps: int
    batch: int
    lr: float
    warmup: int


@dataclass(frozen=True)
class Pools:
    """The weights of the answering adapter's example pools (a pool of weight 0 is not read)."""

    match: float = 0.0  # the model's drawings the judge passed
    mismatch: float = 0.0  # those it failed, with the judge's problem and fix
    synthetic: float = 0.0  # the synthetic reflection cases of the training data (rendered mistakes)
    understanding: float = 0.0  # the understanding questions (the first data's and the fresh ones)
    dotted: float = 0.0  # captions of dot-rich scenes (tasks.dotted_captions)
    counting: float = 0.0  # the counting questions among the understanding ones (a second draw on them)


@dataclass(frozen=True)
class Reflection:
    """One cycle of the answering adapter (saved as OUT/final_reflect_round{i}), continuing the previous one."""

    steps: int
    pools: Pools
    # A new round of drawings first, `cases` training prompts per image task labelled by the judge: "pipeline"
    # the generation pipeline's drawings; "reflected" those after one reflection round with the adapter so far
    # (the repaired image where it found a problem); "chat" a chat turn's drawings (<|img|> forced), what a
    # reflection judges. "none": no new drawings.
    draw: Literal["none", "pipeline", "reflected", "chat"] = "none"
    cases: int = 0
    rounds: Literal["all", "last"] = "all"  # the drawn rounds the match and mismatch pools read
    cell_probe: float = 0.0  # the weight of the cell probe's dot loss (shapes.cell_probe); 0: off
    count_term: float = 0.0  # the weight of the probe's count term (a mean squared error of counts); 0: off


@dataclass(frozen=True)
class Repair:
    """The repair cycle: the final model's chat drawings of `cases` training prompts, each with the judge's fix,
    a `share` of the batch beside the chat mix, one cosine cycle of the transformer."""

    cases: int
    steps: int
    batch: int
    lr: float
    warmup: int
    share: float


STAGES = {
    "data": Data,
    "vae": Vae,
    "mllm": Mllm,
    "transformer": Transformer,
    "vision": Vision,
    "chat": Chat,
    "reflection": Reflection,
    "repair": Repair,
}
ONCE, AT_MOST_ONCE = "once", "at most once"  # the kinds not listed: any number of times
COUNTS = {"data": ONCE, "vae": ONCE, "mllm": ONCE, "vision": AT_MOST_ONCE, "repair": AT_MOST_ONCE}


@dataclass(frozen=True)
class Budget:
    """A budget file, loaded: the stages by kind, each kind in run order."""

    name: str  # the budget's name or its file's path
    data: Data
    vae: Vae
    mllm: Mllm
    transformer: tuple[Transformer, ...]
    vision: Vision | None = None
    chat: tuple[Chat, ...] = ()
    reflection: tuple[Reflection, ...] = ()
    repair: Repair | None = None
    # Train every transformer phase and chat cycle with train.precondition_text (the caption projection through a
    # whitening of its inputs); the repair cycle always does.
    precondition_text: bool = False

    def stages(self) -> list[tuple[str, object]]:
        """(kind, stage) in run order, as the file lists them."""
        out = [("data", self.data), ("vae", self.vae), ("mllm", self.mllm)]
        out += [("transformer", s) for s in self.transformer]
        out += [("vision", self.vision)] if self.vision else []
        out += [("chat", s) for s in self.chat] + [("reflection", s) for s in self.reflection]
        return out + ([("repair", self.repair)] if self.repair else [])

    def to_dict(self) -> dict:
        """The file's form (``stage`` first in each entry)."""
        stages = [{"stage": kind, **dataclasses.asdict(s)} for kind, s in self.stages()]
        return {"precondition_text": self.precondition_text, "stages": stages}


class BudgetError(ValueError):
    """A budget file the recipe cannot use; the message names the file, the stage and the field."""


def budget_names() -> list[str]:
    return sorted(p.stem for p in BUDGETS_DIR.glob("*.yml"))


def budget_path(budget: str | Path) -> Path:
    """The file of a shipped budget's name, or ``budget`` itself when it is a path to a file."""
    path = Path(budget)
    if path.suffix in (".yml", ".yaml") or path.is_file():
        if not path.is_file():
            raise BudgetError(f"budget file {path} does not exist")
        return path
    shipped = BUDGETS_DIR / f"{budget}.yml"
    if not shipped.is_file():
        names = ", ".join(budget_names())
        raise BudgetError(f"no budget {budget!r}: the shipped ones are {names}, or give a .yml path")
    return shipped


def load_budget(budget: str | Path) -> Budget:
    """Read a budget by name (``smoke``, ``cpu``, ``cpu-long``, ``gpu``) or from a YAML file and check it."""
    path = budget_path(budget)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BudgetError(f"{path}: not valid YAML ({e})") from e
    name = path.stem if path.resolve().parent == BUDGETS_DIR else str(path)
    return parse_budget(raw, name, where=str(path))


def parse_budget(raw, name: str, where: str) -> Budget:
    """A budget from the file's parsed content; ``where`` (the file) opens every error message."""
    if not isinstance(raw, dict):
        raise BudgetError(f"{where}: a budget is a mapping with a 'stages' list, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"stages", "precondition_text"})
    if unknown:
        raise BudgetError(f"{where}: unknown top-level field {unknown[0]!r}; fields: stages, precondition_text")
    entries = raw.get("stages")
    if not isinstance(entries, list) or not entries:
        raise BudgetError(f"{where}: 'stages' must be a non-empty list of stages")
    precondition = _typed(raw.get("precondition_text", False), bool, where, "precondition_text")
    by_kind: dict[str, list] = {kind: [] for kind in STAGES}
    order = list(STAGES)
    last = 0
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise BudgetError(f"{where}, stage {i}: each stage is a mapping that names its kind (stage: KIND)")
        kind = entry["stage"]
        at = f"{where}, stage {i} ({kind})"
        if not isinstance(kind, str) or kind not in STAGES:
            raise BudgetError(f"{at}: unknown stage kind; kinds, in run order: {', '.join(STAGES)}")
        if order.index(kind) < last:
            raise BudgetError(f"{at}: out of order; the kinds run in this order: {', '.join(STAGES)}")
        last = order.index(kind)
        if COUNTS.get(kind) and by_kind[kind]:
            raise BudgetError(f"{at}: a budget has {kind} {COUNTS[kind]}")
        fields = {k: v for k, v in entry.items() if k != "stage"}
        by_kind[kind].append((at, _build(STAGES[kind], fields, at)))
    for kind, count in COUNTS.items():
        if count == ONCE and not by_kind[kind]:
            raise BudgetError(f"{where}: no {kind} stage (a budget has it once)")
    if not by_kind["transformer"]:
        raise BudgetError(f"{where}: no transformer stage (a budget has one phase or more)")
    budget = Budget(
        name=name,
        data=by_kind["data"][0][1],
        vae=by_kind["vae"][0][1],
        mllm=by_kind["mllm"][0][1],
        transformer=tuple(s for _, s in by_kind["transformer"]),
        vision=by_kind["vision"][0][1] if by_kind["vision"] else None,
        chat=tuple(s for _, s in by_kind["chat"]),
        reflection=tuple(s for _, s in by_kind["reflection"]),
        repair=by_kind["repair"][0][1] if by_kind["repair"] else None,
        precondition_text=precondition,
    )
    _check(budget, by_kind, where)
    return budget


def _build(cls, fields: dict, at: str, prefix: str = ""):
    """``cls`` from a stage's fields (``prefix``: the path of a nested mapping), each checked against its type."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise BudgetError(f"{at}: unknown field {prefix + unknown[0]!r}; the fields: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in fields]
    if missing:
        raise BudgetError(f"{at}: missing field {prefix + missing[0]!r}")
    hints = get_type_hints(cls)
    return cls(**{k: _typed(v, hints[k], at, prefix + k) for k, v in fields.items()})


def _typed(value, hint, at: str, field: str):
    """``value`` as the field ``field`` of type ``hint`` (int, float, bool, a Literal of strings or a nested
    dataclass given as a mapping)."""
    bad = f"{at}: field {field!r} must be"
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(hint))
            raise BudgetError(f"{bad} a mapping with named keys ({keys}), got {value!r}")
        return _build(hint, value, at, f"{field}.")
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            raise BudgetError(f"{bad} one of {', '.join(get_args(hint))}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise BudgetError(f"{bad} true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BudgetError(f"{bad} a whole number >= 0, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise BudgetError(f"{bad} a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise BudgetError(f"{bad} a number >= 0, got {value!r}")
        return float(value)
    raise TypeError(f"{at}: no rule for field {field!r} of type {hint!r}")  # a new field type: teach _typed


def _check(b: Budget, by_kind: dict[str, list], where: str) -> None:
    """What the recipe needs across stages: the order of the transformer's mixes, the fresh data of the stages
    that read it, drawn rounds before the cycles that read them."""
    phases = by_kind["transformer"]
    mixes = [s.mix for _, s in phases]
    expected = (["t2i"] if mixes[0] == "t2i" else []) + ["first"] + ["fresh"] * (len(mixes) - 1 - (mixes[0] == "t2i"))
    for (at, s), want in zip(phases, expected):
        if s.mix != want:
            raise BudgetError(f"{at}: field 'mix' is {s.mix!r} where {want!r} runs: [t2i], first, then fresh ...")
    if len(mixes) != len(expected):
        raise BudgetError(f"{phases[-1][0]}: a 'first' phase must follow the 't2i' one")
    needs_fresh = [at for at, s in phases if s.mix == "fresh"] + [at for at, _ in by_kind["chat"] + by_kind["repair"]]
    if needs_fresh and not b.data.fresh_per_task:
        raise BudgetError(f"{needs_fresh[0]}: trains on the fresh cases, and the data stage's fresh_per_task is 0")
    for at, s in [*phases, *by_kind["chat"], *by_kind["vision"], *by_kind["vae"], *by_kind["mllm"]]:
        if s.steps < 1 or s.batch < 1:
            raise BudgetError(f"{at}: fields 'steps' and 'batch' must be >= 1")
    drawn = 0
    for at, s in by_kind["reflection"]:
        if s.steps < 1:
            raise BudgetError(f"{at}: field 'steps' must be >= 1")
        if (s.draw == "none") != (s.cases == 0):
            raise BudgetError(f"{at}: field 'cases' is the number of new drawings: > 0 exactly when 'draw' draws")
        if s.draw == "reflected" and drawn == 0:
            raise BudgetError(f"{at}: field 'draw' is 'reflected', and no cycle before it trained an adapter")
        if s.draw == "none" and (s.pools.match or s.pools.mismatch) and drawn == 0:
            raise BudgetError(f"{at}: field 'pools' reads drawings, and no cycle before it drew any")
        drawn += s.draw != "none"
        if drawn == 0:
            raise BudgetError(f"{at}: the first reflection cycle draws (draw: pipeline, reflected or chat)")
        if sum(dataclasses.astuple(s.pools)) <= 0:
            raise BudgetError(f"{at}: field 'pools' gives no pool a weight")
    if b.repair is not None and not (b.repair.steps >= 1 and b.repair.cases >= 1 and 0 < b.repair.share < 1):
        raise BudgetError(f"{by_kind['repair'][0][0]}: needs steps and cases >= 1 and a share in (0, 1)")


__all__ = [
    "Budget",
    "BudgetError",
    "Chat",
    "Data",
    "Mllm",
    "Pools",
    "Reflection",
    "Repair",
    "Transformer",
    "Vae",
    "Vision",
    "budget_names",
    "load_budget",
]
