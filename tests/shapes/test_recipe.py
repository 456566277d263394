"""The bundled model's recipe end to end at the smoke budget: every stage runs with the project's own code and
the result loads as a pipeline (with its reflection adapter) and generates. Quality is not checked here (smoke
steps train nothing); tests/shapes/test_builtin.py checks the shipped model's quality."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from omnigen2 import OmniGen2ChatPipeline
from omnigen2.loading import load_reflection_adapter
from omnigen2.shapes import recipe, reflection


def test_smoke_recipe_end_to_end(tmp_path, monkeypatch):
    final = recipe.run(tmp_path, "smoke", curve=2)
    assert final == tmp_path / "final_repair"
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
        "phase4_pipeline/model_index.json",  # and phase 5 (a third extra_steps entry) from phase 4's
        "transformer_more3/metrics.jsonl",
        "mllm_vision/understanding.json",
        "transformer_chat/metrics.jsonl",  # the chat phase, after the vision stage (two cycles)
        "transformer_chat2/metrics.jsonl",
        "final_chat/model_index.json",
        "final_reflect_round3/model_index.json",  # answer_steps: the adapter once more after the two rounds
        "reflection_round3/records.jsonl",  # redraw_steps: a third round of drawings after the answer cycles
        "final_reflect_round4/model_index.json",
        "final_reflect_round5/model_index.json",  # understanding_steps: a cycle on understanding questions alone
        "reflection_round4/records.jsonl",  # settle_steps: a round of new drawings, understanding weighted up
        "final_reflect_round6/model_index.json",
        "final_reflect_round7/model_index.json",  # dot_steps: dot-rich captions and the cell probe
        "final_reflect_round8/model_index.json",  # resettle_steps: the settling round's drawings again
        "final_reflect_round9/model_index.json",  # count_steps: counting weighted up, the probe's count term on
        "final_reflect/model_index.json",
        "data/repair/records.jsonl",  # the repair cycle: the final model's drawings and the judge's fixes
        "transformer_repair/metrics.jsonl",
    ):
        assert (tmp_path / stage).is_file(), stage
    assert not (tmp_path / "reflection_round5").exists()  # the re-settling and counting rounds draw nothing new
    assert json.loads((tmp_path / "vae" / "reconstruction.json").read_text())["judge_pass_rate"] >= 0.0
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
    assert mix[-1] == {"path": "repair/records.jsonl", "ratio": recipe.BUDGETS["smoke"].repair_share}
    assert (reflected / weights).read_bytes() != (final / weights).read_bytes()
    adapter = "mllm_reflection/adapter_model.safetensors"
    assert (reflected / adapter).read_bytes() == (final / adapter).read_bytes()
    # The final pipeline carries the grown vision tower (the language model is the frozen first one).
    vision = json.loads((final / "mllm" / "config.json").read_text())["vision_config"]
    assert vision["depth"] == recipe.BUDGETS["smoke"].vision_depth
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

    # An interrupted adapter stage continues after its last saved cycle: only the last cycle trains again, from the
    # adapter the one before it saved; a final pipeline that carries an adapter already still trains a clean MLLM.
    shutil.rmtree(reflected)
    shutil.rmtree(tmp_path / "final_reflect_round9")
    starts, train = [], reflection.train_reflection_adapter
    monkeypatch.setattr(reflection, "train_reflection_adapter", lambda *a, **k: starts.append(k) or train(*a, **k))
    assert recipe.stage_reflection(tmp_path, tmp_path / "final_reflect_round1", recipe.BUDGETS["smoke"]) == reflected
    before = load_reflection_adapter(tmp_path / "final_reflect_round8")["state_dict"]
    assert len(starts) == 1 and starts[0]["cell_aux"] == recipe.RESETTLE_AUX  # the counting round keeps the probe
    assert starts[0]["count_aux"] == recipe.COUNT_AUX  # with its count term
    starts = [k["adapter"] for k in starts]
    assert starts[0]["state_dict"].keys() == before.keys()
    # The dot cycles trained the tower's patch embedding and merger too (the LoRA targets of REFLECTION_LORA).
    assert any("patch_embed" in k for k in before) and any("merger" in k for k in before)
    assert all(starts[0]["state_dict"][k].equal(before[k]) for k in before)
    assert (reflected / "mllm_reflection" / "adapter_model.safetensors").is_file()


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
    assert not recipe.BUDGETS["smoke"].precondition_text  # the override, not the budget
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
