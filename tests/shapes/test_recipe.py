"""The bundled model's recipe end to end at the smoke budget: every stage runs with the project's own code and
the result loads as a pipeline (with its reflection adapter) and generates. Quality is not checked here (smoke
steps train nothing); tests/shapes/test_builtin.py checks the shipped model's quality."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from omnigen2 import OmniGen2ChatPipeline
from omnigen2.loading import load_reflection_adapter
from omnigen2.shapes import recipe, reflection
from omnigen2.shapes.budgets import BUDGETS_DIR, BudgetError, Pools, budget_names, load_budget

SMOKE = load_budget("smoke")


@pytest.mark.slow  # ~140 s on 2 idle cores: run by `pytest -m slow` (.ci/run)
def test_smoke_recipe_end_to_end(tmp_path, monkeypatch):
    final = recipe.run(tmp_path, "smoke", curve=2)
    assert final == tmp_path / "final_repair"
    assert (tmp_path / recipe.RESULT_FILE).read_text() == "final_repair\n"  # which folder is the result
    reflected = tmp_path / "final_reflect"
    for stage in (
        "data/mix.yml",
        "tokenizer/tokenizer.json",
        "vae/reconstruction.json",
        "mllm/understanding.json",
        "t2i_pipeline/model_index.json",  # phase 1 of the transformer (text-to-image only), phase 2 starts from it
        "data/more/mix.yml",  # phase 3's fresh cases
        "phase2_pipeline/model_index.json",  # phase 3 starts from phase 2's EMA weights
        "transformer_more/metrics.jsonl",
        "phase3_pipeline/model_index.json",  # phase 4 restarts from phase 3's EMA weights
        "transformer_more2/metrics.jsonl",
        "phase4_pipeline/model_index.json",  # and phase 5 (the third "fresh" transformer stage) from phase 4's
        "transformer_more3/metrics.jsonl",
        "mllm_vision/understanding.json",
        "transformer_chat/metrics.jsonl",  # the chat phase, after the vision stage (two cycles)
        "transformer_chat2/metrics.jsonl",
        "final_chat/model_index.json",
        "final_reflect_round3/model_index.json",  # the third reflection stage: an answer cycle after the two rounds
        "reflection_round3/records.jsonl",  # the fourth (draw: chat): a third round of drawings
        "final_reflect_round4/model_index.json",
        "final_reflect_round5/model_index.json",  # the fifth: a cycle on understanding questions alone
        "reflection_round4/records.jsonl",  # the sixth (draw: chat): new drawings, understanding weighted up
        "final_reflect_round6/model_index.json",
        "final_reflect_round7/model_index.json",  # the seventh: dot-rich captions and the cell probe
        "final_reflect_round8/model_index.json",  # the eighth: the settling round's drawings again
        "final_reflect_round9/model_index.json",  # the ninth: counting weighted up, the probe's count term on
        "final_reflect/model_index.json",
        "data/repair/records.jsonl",  # the repair cycle: the final model's drawings and the judge's fixes
        "transformer_repair/metrics.jsonl",
    ):
        assert (tmp_path / stage).is_file(), stage
    assert not (tmp_path / "reflection_round5").exists()  # the re-settling and counting rounds draw nothing new
    reconstruction = json.loads((tmp_path / "vae" / "reconstruction.json").read_text())
    assert 0.0 <= reconstruction["judge_pass_rate"] <= 1.0 and 0.0 < reconstruction["l1"] < 1.0
    curve = json.loads((tmp_path / "learning_curve.json").read_text())
    assert [row["step"] for row in curve] == sorted(row["step"] for row in curve) and curve
    assert {row["phase"] for row in curve} == {
        "transformer_t2i",
        "transformer_run",
        "transformer_more",
        "transformer_more2",
        "transformer_more3",
    }
    # The chat phase trains on chat-form samples that show the MLLM their images; its weights are the final ones.
    chat_cfg = yaml.safe_load((tmp_path / "chat2_config.yml").read_text())["data"]
    assert chat_cfg["chat_images"] and chat_cfg["generation_prompt_prob"] > 0
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "final_chat" / weights).read_bytes() == (reflected / weights).read_bytes()
    # The repair cycle trains the transformer last (whitened text projection, its pairs beside the chat mix) and
    # keeps the MLLM and its answering adapter.
    repair_cfg = yaml.safe_load((tmp_path / "repair_config.yml").read_text())
    assert repair_cfg["train"]["precondition_text"] and repair_cfg["model"]["pretrained"] == str(reflected)
    mix = yaml.safe_load((tmp_path / "data" / "repair.yml").read_text())["data"]
    assert mix[-1] == {"path": "repair/records.jsonl", "ratio": SMOKE.repair.share}
    assert (reflected / weights).read_bytes() != (final / weights).read_bytes()
    adapter = "mllm_reflection/adapter_model.safetensors"
    assert (reflected / adapter).read_bytes() == (final / adapter).read_bytes()
    # The final pipeline carries the grown vision tower (the language model is the frozen first one).
    vision = json.loads((final / "mllm" / "config.json").read_text())["vision_config"]
    assert vision["depth"] == SMOKE.vision.depth
    index = json.loads((final / "model_index.json").read_text())
    assert index["omnigen2_domain"] == "shapes" and index["omnigen2_sampling"] == recipe.SAMPLING
    assert (final / "mllm_reflection" / "adapter_model.safetensors").is_file()

    chat = OmniGen2ChatPipeline.from_pretrained(final)
    chat.set_progress_bar_config(disable=True)
    assert chat._adapter_layers  # the reflection adapter is attached (and off outside judging)
    out = chat("a red circle", assistant_prefix="<|img|>", num_inference_steps=2)
    assert out.images[0].size == (64, 64)
    # Rerunning finds every stage done and returns the same model.
    assert recipe.run(tmp_path, "smoke") == final
    # What only the run needed is gone (the training checkpoints, read by the learning curve), and the pipelines
    # handed from stage to stage share their unchanged files: the frozen VAE takes its disk once.
    assert not list(tmp_path.glob("*/checkpoints")) and (tmp_path / "transformer_more3" / "config.yml").is_file()
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert all((tmp_path / "base" / vae).samefile(tmp_path / d / vae) for d in ("t2i_pipeline", "final_chat", final))

    # An interrupted adapter stage continues after its last saved cycle: only the last cycle trains again, from the
    # adapter the one before it saved; a final pipeline that carries an adapter already still trains a clean MLLM.
    shutil.rmtree(reflected)
    shutil.rmtree(tmp_path / "final_reflect_round9")
    starts, train = [], reflection.train_reflection_adapter
    monkeypatch.setattr(reflection, "train_reflection_adapter", lambda *a, **k: starts.append(k) or train(*a, **k))
    assert recipe.stage_reflection(tmp_path, tmp_path / "final_reflect_round1", SMOKE) == reflected
    before = load_reflection_adapter(tmp_path / "final_reflect_round8")["state_dict"]
    counting = SMOKE.reflection[-1]
    assert len(starts) == 1 and starts[0]["cell_aux"] == counting.cell_probe > 0  # the counting round keeps the probe
    assert starts[0]["count_aux"] == counting.count_term > 0  # with its count term
    starts = [k["adapter"] for k in starts]
    assert starts[0]["state_dict"].keys() == before.keys()
    # The dot cycles trained the tower's patch embedding and merger too (the LoRA targets of REFLECTION_LORA).
    assert any("patch_embed" in k for k in before) and any("merger" in k for k in before)
    assert all(starts[0]["state_dict"][k].equal(before[k]) for k in before)
    assert (reflected / "mllm_reflection" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # ~25 s on 2 idle cores
def test_recipe_on_reused_parts_trains_only_the_transformer(tmp_path):
    """``--parts``: the tokenizer, VAE, MLLM and answering adapter come from an existing Shapes pipeline unchanged
    (no vision or reflection stage), the transformer trains on that MLLM's states, here with the text
    preconditioner the budget leaves off."""
    from safetensors.torch import load_file

    from omnigen2.loading import resolve_path

    src = resolve_path("builtin:shapes")
    final = recipe.run(tmp_path, "smoke", parts="builtin:shapes", precondition_text=True)
    assert final == tmp_path / "final_repair"  # the chat phase, then the repair cycle
    for rel in ("mllm/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        new, old = load_file(final / rel), load_file(src / rel)
        assert new.keys() == old.keys() and all(new[k].equal(old[k]) for k in old), rel
    for rel in ("processor/tokenizer.json", "mllm_reflection/adapter_model.safetensors"):
        assert (final / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert not (tmp_path / "mllm_vision").exists() and not (tmp_path / "final_reflect").exists()
    for phase in ("t2i_config.yml", "transformer_config.yml", "phase3_config.yml", "chat2_config.yml"):
        assert yaml.safe_load((tmp_path / phase).read_text())["train"]["precondition_text"], phase
    assert not SMOKE.precondition_text  # the override, not the budget
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["parts"] == "builtin:shapes" and budget["precondition_text"]
    trained = load_file(final / "transformer/diffusion_pytorch_model.safetensors")
    shipped = load_file(src / "transformer/diffusion_pytorch_model.safetensors")
    assert not all(trained[k].equal(shipped[k]) for k in shipped if k in trained)  # a new transformer

    chat = OmniGen2ChatPipeline.from_pretrained(final)
    chat.set_progress_bar_config(disable=True)
    assert chat._adapter_layers
    assert chat("a red circle", assistant_prefix="<|img|>", num_inference_steps=2).images[0].size == (64, 64)


def test_recipe_parts_without_a_component_is_refused(tmp_path):
    (tmp_path / "src" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has no processor/, mllm/ folder"):
        recipe.stage_parts(tmp_path / "out", str(tmp_path / "src"))
    assert not (tmp_path / "out").exists()  # nothing copied


# -- the budget files ------------------------------------------------------------------------------------------------

BEFORE = json.loads((Path(__file__).parent / "recipe_budgets_before.json").read_text())


def _training_plan(b, out: Path, monkeypatch) -> list[dict]:
    """The transformer runs the recipe asks of the trainer for budget ``b`` (record file and config; the repair
    cycle with its mix), without training: every run and export is recorded instead."""
    runs = []
    monkeypatch.setattr(
        recipe, "_cycle", lambda cfg, record, pipeline, *a: runs.append({"record": record.name, "cfg": cfg}) or pipeline
    )
    (out / "data" / "repair").mkdir(parents=True)
    (out / "data" / "repair" / "records.jsonl").write_text("")  # the repair drawings, as if made
    recipe.stage_transformer(out, out / "data", b, out / "base")
    if b.chat:
        recipe.stage_chat(out, out / "data", b, out / "final")
    if b.repair:
        recipe.stage_repair(out, out / "data", b, out / "final_reflect")
        runs[-1]["mix"] = (out / "data" / "repair.yml").read_text()
    return json.loads(json.dumps(runs).replace(str(out), "OUT"))


@pytest.mark.parametrize("name", ["smoke", "cpu", "cpu-long", "gpu"])
def test_budget_files_train_what_the_python_budgets_did(name, tmp_path, monkeypatch):
    """budgets/NAME.yml gives every stage the numbers the Python budget gave it (recipe_budgets_before.json)."""
    b, before = load_budget(name), BEFORE[name]
    old = before["budget"]
    assert (b.data.per_task, b.data.understanding, b.data.fresh_per_task) == (
        old["n_per_task"],
        old["n_understanding"],
        old["extra_per_task"],
    )
    assert (b.vae.steps, b.vae.batch, b.mllm.steps, b.mllm.batch) == (
        old["vae_steps"],
        old["vae_batch"],
        old["mllm_steps"],
        old["mllm_batch"],
    )
    vision = (old["vision_steps"], old["mllm_batch"], old["vision_depth"], old["vision_hidden"])
    assert (b.vision and (b.vision.steps, b.vision.batch, b.vision.depth, b.vision.hidden)) == (
        vision if old["vision_steps"] else None
    )
    assert b.precondition_text == old["precondition_text"]
    runs = before["transformer_runs"]
    if name == "gpu":
        # The gpu budget's repair cycle read the fresh cases, which that budget never wrote: it could not run. The
        # budget file leaves it out (a budget that asks for it without fresh cases is refused, below).
        assert runs[-1]["record"] == "repair_config.yml" and not old["extra_per_task"] and b.repair is None
        runs = runs[:-1]
    assert _training_plan(b, tmp_path / "OUT", monkeypatch) == runs

    # The answering adapter's cycles: the same steps, pools and probe weights; the same rounds drawn (with the same
    # seeds and folders: a round's number), read, and drawn the same way.
    cycles = before["reflection"]
    assert len(b.reflection) == len(cycles)
    seen = set()
    for c, r, old_c in zip(b.reflection, recipe.drawn_rounds(b.reflection), cycles, strict=True):
        assert (c.steps, Pools(**old_c["pools"]), c.cell_probe, c.count_term) == (
            old_c["steps"],
            c.pools,
            old_c["cell_aux"],
            old_c["count_aux"],
        )
        draws = old_c["round"] is not None and old_c["round"] not in seen
        seen.add(old_c["round"])
        assert r == (old_c["round"] if draws else None)
        assert c.draw == ("none" if not draws else "chat" if old_c["late"] else ("pipeline", "reflected")[r - 1])
        assert c.cases == (old_c["cases"] if draws else 0)
        assert (c.rounds == "last") == old_c["late"]  # a late round's pools read that round alone


def test_budget_by_path_and_its_errors(tmp_path):
    """``--budget FILE`` reads any budget file; what the recipe cannot use is refused with the file, the stage
    (its number and kind) and the field named."""
    text = (BUDGETS_DIR / "smoke.yml").read_text()
    (tmp_path / "mine.yml").write_text(text)
    mine = load_budget(tmp_path / "mine.yml")
    assert mine.name == str(tmp_path / "mine.yml") and mine.stages() == SMOKE.stages()
    assert sorted(budget_names()) == ["cpu", "cpu-long", "gpu", "smoke"]

    vae_line = "  - {stage: vae, steps: 4, batch: 4}\n"
    edits = [  # (what the file says, what it says instead, what the error names)
        ("{stage: vae, steps: 4,", "{stage: vae, stpes: 4,", r"stage 2 \(vae\): unknown field 'stpes'"),
        ("{stage: vae, steps: 4, batch: 4}", "{stage: vae, steps: 4}", r"stage 2 \(vae\): missing field 'batch'"),
        ("{stage: mllm, steps: 4,", "{stage: mllm, steps: four,", r"stage 3 \(mllm\): field 'steps' must be"),
        ("lr: 2.0e-4", "lr: fast", r"stage 21 \(repair\): field 'lr' must be a number"),
        ("pools: {understanding: 1.0}", "pools: [1.0]", r"stage 16 \(reflection\): field 'pools' must be a mapping"),
        ("pools: {understanding: 1.0}", "pools: {understnading: 1.0}", r"unknown field 'pools.understnading'"),
        ("mix: first", "mix: second", r"stage 5 \(transformer\): field 'mix' must be one of"),
        ("draw: pipeline", "draw: reflected", r"stage 12 \(reflection\): .*no cycle before it"),
        ("stage: data", "stage: dataset", r"stage 1 \(dataset\): unknown stage kind"),
        (vae_line, "", r"stage 21 \(vae\): out of order"),  # (the vae stage moved to the end)
        ("    fresh_per_task: 8\n", "", r"stage 6 \(transformer\): trains on the fresh cases"),
        ("precondition_text: false", "precondition_text: no way", r"field 'precondition_text' must be"),
    ]
    for old, new, match in edits:
        assert old in text, old
        path = tmp_path / "bad.yml"
        path.write_text(text.replace(old, new) + (vae_line if old == vae_line else ""))
        with pytest.raises(BudgetError, match=match) as e:
            load_budget(path)
        assert str(path) in str(e.value)
    with pytest.raises(BudgetError, match="no budget 'tiny'"):
        load_budget("tiny")
    with pytest.raises(SystemExit):
        recipe.main(["--budget", str(tmp_path / "bad.yml"), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
