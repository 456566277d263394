"""Reflection training data from a model's own outputs, the paper's way, with the judge as the external VLM.

OmniGen2 builds its reflection data by generating images with the model itself, having a strong VLM say whether
each output follows the instruction and, when not, what is wrong and how to fix it. Here the ShapesBench judge
plays the VLM: :func:`diagnose` reads an output back into a scene and, when the case's target fails, searches the
editing grammar for a fix; :func:`reflection_records` runs a generator on training cases and writes the
diagnoses as understanding-format records next to the generated images; :func:`repair_records` turns the same
diagnoses into editing examples for the transformer (the output as the input image, the fix as the instruction,
the fixed scene as the target), so that the editing path learns the repairs a reflection asks of it.

The fix search. The candidate edits of a scene are listed in a fixed preference order — by kind
(:data:`PREFERENCE`: recolor, reshape, move, remove, add, background), then by object in reading order, then by
value in palette / cell order — and only edits that can help are listed: a recolor, reshape or add must produce
an object that some target pattern wants (shape, color and dot: no edit can add or change a dot), a move only
moves a wanted object, a background change only goes to the target's background. The diagnosis is:

- ``match``      the target passes; the answer is exactly ``MATCHES``;
- ``mismatch``   the first candidate whose result passes the target; answered as ``MISMATCH`` with the problem
                 worded as ``tasks`` words it (:meth:`Edit.problem`);
- ``partial``    no single edit repairs the image, but two do: the answer names the first edit of the first
                 two-edit repair in preference order (the first step the chat pipeline's reflect loop would take);
                 its fix does not fully repair the image, so the judge's ``fix_repairs`` is False for it;
- ``unfixable``  no repair in two edits (a wrong dot, an ambiguous duplicate, ...): no answer, the caller skips;
- ``unreadable`` the judge cannot read the image (a blob that fits no shape or color): the caller skips.

Edits that break the world's rules (a shared cell, a dot of the object's color, an ambiguous object) are
skipped, as ``tasks`` skips them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from . import judge
from .dataset import _write_jsonl
from .render import render
from .tasks import (
    COLORS,
    IMAGE_TASKS,
    MATCHES,
    MISMATCH,
    REFLECT_QUESTION,
    SHAPES,
    Case,
    Edit,
    Target,
    cases,
    stable_hash,
)
from .world import InvalidScene, Scene

PREFERENCE = ("recolor", "reshape", "move", "remove", "add", "background")
KINDS = ("match", "mismatch", "partial", "unfixable", "unreadable")
WRITTEN = ("match", "mismatch", "partial")  # the kinds that make a record

# A generator answers a case with one image, as ShapesBench calls it.
Generate = Callable[[str, list[PIL.Image.Image], torch.Generator | None], PIL.Image.Image]


@dataclass(frozen=True)
class Diagnosis:
    """What the judge, as the reflecting VLM, says about one output. ``verdict`` is the answer's verdict
    ("match" / "mismatch") or "unreadable"; ``kind`` refines a mismatch by how far ``edit`` gets."""

    kind: str  # one of KINDS
    scene: Scene | None  # the scene read from the image (None when unreadable)
    answer: str | None = None  # the reflection answer (None: nothing to train on)
    edit: Edit | None = None  # the proposed fix
    reason: str = "ok"  # the target's failed check, or why the image could not be read

    @property
    def verdict(self) -> str:
        return {"match": "match", "unreadable": "unreadable"}.get(self.kind, "mismatch")

    @property
    def problem(self) -> str | None:
        return self.edit.problem() if self.edit else None

    @property
    def repairs(self) -> bool | None:
        """Whether the fix alone repairs the image (None without a fix)."""
        return None if self.edit is None else self.kind == "mismatch"


# -- the fix search ---------------------------------------------------------------------------------------------


def candidate_edits(scene: Scene, target: Target) -> list[Edit]:
    """Every edit of ``scene`` that can help towards ``target``, in preference order (see the module doc)."""
    looks = {(p.shape, p.color, p.dot) for p in target.patterns}
    # Edits name an object by kind, so only objects whose kind is unique in the scene can be edited.
    named = [o for o in scene.objects if len(scene.find(*o.kind)) == 1]
    free = scene.free_cells()
    by_kind = {
        "recolor": [
            Edit("recolor", o.color, o.shape, c)
            for o in named
            for c in COLORS
            if c != o.color and (o.shape, c, o.dot) in looks
        ],
        "reshape": [
            Edit("reshape", o.color, o.shape, s)
            for o in named
            for s in SHAPES
            if s != o.shape and (s, o.color, o.dot) in looks
        ],
        "move": [Edit("move", o.color, o.shape, cell) for o in named if o.look in looks for cell in free],
        "remove": [Edit("remove", o.color, o.shape) for o in named],
        "add": [
            Edit("add", p.color, p.shape, cell)
            for p in dict.fromkeys(p for p in target.patterns if p.dot is None)  # pattern order, no repeats
            for cell in (free if p.cell is None else [p.cell] if p.cell in free else [])
        ],
        "background": [Edit("background", value=target.background)] if scene.background != target.background else [],
    }
    return [e for kind in PREFERENCE for e in by_kind[kind]]


def _applied(edit: Edit, scene: Scene) -> Scene | None:
    try:
        return edit.apply(scene)
    except InvalidScene:  # the edit breaks a rule of the world: not a candidate
        return None


def repair(scene: Scene, target: Target) -> Edit | None:
    """The first candidate edit after which ``target`` passes, or None."""
    for edit in candidate_edits(scene, target):
        after = _applied(edit, scene)
        if after is not None and target.check(after)[0]:
            return edit
    return None


def first_step(scene: Scene, target: Target) -> Edit | None:
    """The first candidate edit after which a single edit repairs the scene (of a two-edit repair), or None."""
    for edit in candidate_edits(scene, target):
        after = _applied(edit, scene)
        if after is not None and repair(after, target) is not None:
            return edit
    return None


def diagnose(case: Case, image) -> Diagnosis:
    """Judge a generated image against an image case's target (t2i, edit, in-context, or a reflection case's
    judged instruction), the way the reflecting VLM answers ``REFLECT_QUESTION``."""
    if case.target is None:
        raise ValueError(f"{case.name} has no image target to judge against")
    scene = judge.read(image)
    if isinstance(scene, judge.Failure):
        return Diagnosis("unreadable", None, reason=scene.reason)
    passed, reason = case.target.check(scene)
    if passed:
        return Diagnosis("match", scene, MATCHES)
    kind, edit = "mismatch", repair(scene, case.target)
    if edit is None:
        kind, edit = "partial", first_step(scene, case.target)
    if edit is None:
        return Diagnosis("unfixable", scene, reason=reason)
    return Diagnosis(kind, scene, MISMATCH.format(problem=edit.problem(), fix=edit.prompt()), edit, reason)


# -- records ----------------------------------------------------------------------------------------------------


@dataclass
class ReflectionSummary:
    root: Path
    file: Path  # records.jsonl
    records: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # diagnosis kind -> judged images (they add up to all)
    fixes: dict[str, int] = field(default_factory=dict)  # edit kind -> written mismatch / partial records
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> diagnosis kind -> judged images


def _stem(case: Case) -> str:
    return f"{case.task}_{case.category.replace(' ', '_')}_{case.seed}"


def _image_tasks(tasks: Sequence[str], what: str) -> None:
    bad = [t for t in tasks if t not in IMAGE_TASKS]
    if bad:
        raise ValueError(f"{what} come from image tasks ({', '.join(IMAGE_TASKS)}), not {bad}")


def _judged_outputs(generate: Generate, n, split, start, tasks, progress, seed, tag, summary: ReflectionSummary):
    """(case, inputs, output, diagnosis) for the output ``generate`` gives on each of n cases per task (a torch
    generator seeded from ``(tag, seed, case)``), every diagnosis counted into ``summary``."""
    counts, per_task = Counter(), {task: Counter() for task in tasks}
    case_list = [c for task in tasks for c in cases(task, n, split=split, start=start)]
    for case in tqdm(case_list, desc=tag, disable=not progress):
        inputs = case.input_images()
        g = torch.Generator().manual_seed(stable_hash(tag, seed, case.name) % 2**63)
        output = generate(case.prompt, inputs, g)
        d = diagnose(case, output)
        counts[d.kind] += 1
        per_task[case.task][d.kind] += 1
        yield case, inputs, output, d
    summary.kinds = {k: counts[k] for k in KINDS}
    summary.tasks = {t: {k: c[k] for k in KINDS} for t, c in per_task.items()}


def _written(summary: ReflectionSummary, records: list[dict], fixes: Counter) -> ReflectionSummary:
    _write_jsonl(summary.file, records)
    summary.records = len(records)
    summary.fixes = {k: fixes[k] for k in PREFERENCE}
    return summary


def _start(out_dir) -> tuple[Path, ReflectionSummary]:
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    return root, ReflectionSummary(root, root / "records.jsonl")


def reflection_records(
    generate: Generate,
    n: int,
    out_dir: str | os.PathLike,
    split: str = "train",
    start: int = 0,
    tasks: Sequence[str] = ("t2i",),
    progress: bool = True,
    seed: int = 0,
    kinds: Sequence[str] = WRITTEN,
) -> ReflectionSummary:
    """Generate n cases per image task (seeds >= ``start`` of ``split``; only "train" makes training data),
    diagnose each output and write the diagnoses of the given ``kinds`` to ``out_dir/records.jsonl`` with the
    generated images (and, for edit / in-context cases, the inputs) under ``out_dir/images/``.

    A record is ``{image, question, answer, instruction, category: "model-{kind}", seed}`` plus ``task``,
    ``case_category`` and ``input_images`` (the case's inputs: the judged answer only needs the output, but the
    instruction of an edit refers to them). ``generate`` is called as ShapesBench calls it, with a torch
    generator seeded from ``(seed, case)``."""
    _image_tasks(tasks, "reflection records")
    if unknown := set(kinds) - set(WRITTEN):
        raise ValueError(f"only {', '.join(WRITTEN)} diagnoses have an answer to write, not {sorted(unknown)}")
    root, summary = _start(out_dir)
    records, fixes = [], Counter()
    outputs = _judged_outputs(generate, n, split, start, tasks, progress, seed, "reflection-records", summary)
    for case, inputs, output, d in outputs:
        if d.kind not in kinds:
            continue
        stem = _stem(case)
        name = f"images/{stem}_out.png"
        output.convert("RGB").save(root / name)
        input_paths = [f"images/{stem}_in{i}.png" for i in range(len(inputs))]
        for im, path in zip(inputs, input_paths, strict=True):
            im.save(root / path)
        records.append(
            {
                "image": name,
                "question": REFLECT_QUESTION.format(instruction=case.prompt),
                "answer": d.answer,
                "instruction": case.prompt,
                "category": f"model-{d.kind}",
                "seed": case.seed,
                "task": case.task,
                "case_category": case.category,
                "input_images": input_paths,
            }
        )
        if d.edit is not None:
            fixes[d.edit.kind] += 1
    return _written(summary, records, fixes)


def repair_records(
    generate: Generate,
    n: int,
    out_dir: str | os.PathLike,
    *,
    split="train",
    start=0,
    tasks=("t2i",),
    progress=True,
    seed=0,
) -> ReflectionSummary:
    """Editing examples for the transformer from the model's own outputs: what a reflection asks of the editing
    path. Each output of ``generate`` (n cases per image task, seeds >= ``start`` of ``split``) the judge can
    repair or start repairing with one edit (a ``mismatch`` or ``partial`` diagnosis) becomes an edit record
    whose input is that output, whose instruction is the fix, and whose target is the scene the judge read from
    the output with the fix applied, rendered (``out_dir/records.jsonl``, the training data format, images under
    ``out_dir/images/``). The transformer's editing data otherwise shows it rendered scenes only, never its own
    drawings, which are what a reflection's repair starts from."""
    _image_tasks(tasks, "repair records")
    root, summary = _start(out_dir)
    records, fixes = [], Counter()
    outputs = _judged_outputs(generate, n, split, start, tasks, progress, seed, "repair-records", summary)
    for case, _, output, d in outputs:
        after = None if d.edit is None else _applied(d.edit, d.scene)
        if after is None:
            continue
        stem = _stem(case)
        output.convert("RGB").save(root / f"images/{stem}_in0.png")
        render(after, stable_hash(case.name, "repair-target", 0)).save(root / f"images/{stem}_out.png")
        records.append(
            {
                "task_type": "edit",
                "instruction": d.edit.prompt(),
                "input_images": [f"images/{stem}_in0.png"],
                "output_image": f"images/{stem}_out.png",
                "category": f"repair-{d.edit.kind}",
                "seed": case.seed,
                "task": case.task,
                "case_category": case.category,
                "kind": d.kind,
            }
        )
        fixes[d.edit.kind] += 1
    return _written(summary, records, fixes)


# -- the reflection adapter ---------------------------------------------------------------------------------------

# LoRA on the language model's projections and the vision tower's blocks. The MLLM itself stays frozen: the
# diffusion transformer is conditioned on its hidden states, so answering about images (understanding and
# judging) is taught to an adapter that the chat pipeline switches on for text answers and judging turns only
# (OmniGen2ChatPipeline.answering). Rank 64 of the bundled model's width 128: understanding needs the capacity.
REFLECTION_LORA = {
    "r": 64,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
    # The tower's patch embedding and merger too: with the cell probe (cell_aux) the tower learns the dots it
    # dropped. An adapter saved before (without them) loads and continues with those layers starting at zero.
    "target_modules": r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)|visual\.patch_embed\.proj|visual\.merger\.mlp\.(0|2))",
}


def read_records(path: str | os.PathLike) -> list[tuple[list[PIL.Image.Image], str, str]]:
    """(images, question, answer) triples of an understanding-format records.jsonl (images relative to it)."""
    import json

    path = Path(path)
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out.append(([PIL.Image.open(path.parent / r["image"]).convert("RGB")], r["question"], r["answer"]))
    return out


def train_reflection_adapter(
    mllm,
    batcher,
    examples: Sequence,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    adapter: dict | None = None,
    cell_aux: float = 0.0,
    count_aux: float = 0.0,
) -> tuple[dict, list[float]]:
    """Train the reflection LoRA on (images, question, answer) examples, starting from ``adapter`` when given (the
    second round continues the first). ``mllm`` is not modified (a copy is trained). With ``cell_aux > 0`` the
    vision tokens also learn each cell's dot (:mod:`.cell_probe`, that weight on its loss), with ``count_aux > 0``
    the per-shape counts as a sum over the tokens (the same probe, that weight on its count loss). Returns the
    adapter in the checkpoint's form, ``{"config", "state_dict"}``, and the loss history."""
    import copy
    import random

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    from .pretrain import train_mllm

    model = copy.deepcopy(mllm)
    inject_adapter_in_model(LoraConfig(**REFLECTION_LORA), model, adapter_name="reflection")
    if adapter is not None:
        set_peft_model_state_dict(model, adapter["state_dict"], adapter_name="reflection")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)

    trained, labels, probing = model, {}, cell_aux > 0 or count_aux > 0
    if probing:
        from .cell_probe import CellProbe, probe_labels

        trained = CellProbe(model, cell_aux, count_aux)

    def batch(step: int):
        rng = random.Random(step)
        picked = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        out = batcher(picked)
        if probing:  # the judge reads each image once; (N_images, 13) in the batch's image order
            images = [im for ims, _, _ in picked for im in ([] if ims is None else ims)]
            for im in images:
                if id(im) not in labels:  # (setdefault would read it again every time)
                    labels[id(im)] = probe_labels(im)
            out["cell_labels"] = torch.tensor([labels[id(im)] for im in images], dtype=torch.long).reshape(
                len(images), -1
            )
        return out

    history = train_mllm(trained, batch, steps, lr=lr, warmup=min(50, steps // 10))
    if probing:
        trained.remove()  # the probe's head is dropped; the adapter keeps what it taught the tower
    state = get_peft_model_state_dict(model, adapter_name="reflection")
    return {"config": {"peft_type": "LORA", **REFLECTION_LORA}, "state_dict": state}, history
