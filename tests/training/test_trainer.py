"""The trainer on the official-tiny checkpoint: overfitting, exact resume, multi-process equivalence,
gradient accumulation, EMA, LoRA in the original format, token embeddings, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from omnigen2 import OmniGen2Pipeline
from omnigen2.training import Trainer, config_from_dict, export, precondition
from omnigen2.training.data import ImageSpec


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def eval_loss(trainer: Trainer) -> float:
    """Loss on fixed (time, noise) draws of every sample: a noise-free measure of fit."""
    total = 0.0
    for pos in range(8):
        batch = trainer.data.batch(10**6 + pos, range(pos % 4, pos % 4 + 1))
        total += trainer.micro_loss(batch, 10**6 + pos, 1.0)[1].item()
    return total / 8


def sample_mse(pipe, four_samples) -> float:
    """Generate each training sample from its instruction (and inputs); MSE against the target's latents.

    Measured in latent space: the tiny checkpoint's VAE is random, so pixels would measure the VAE."""
    img = lambda i: Image.open(four_samples / "img" / f"{i}.png").convert("RGB")  # noqa: E731
    cases = [
        ("A red circle.", None, 0),
        ("A blue square.", None, 1),
        ("Make it green.", [img(0)], 2),
        ("Combine them.", [img(1), img(2)], 3),
    ]
    err = 0.0
    for k, (prompt, inputs, target) in enumerate(cases):
        out = pipe(
            prompt=prompt,
            input_images=inputs,
            height=64,
            width=64,
            num_inference_steps=20,
            text_guidance_scale=1.0,
            output_type="latent",
            max_pixels=4096,
            generator=torch.Generator().manual_seed(k),
        ).images[0]
        ref = pipe.encode_images([img(target)], 4096, None)[0]
        err += (out - ref).square().mean().item()
    return err / len(cases)


@pytest.mark.slow  # 32 s on 2 idle CPU cores (Xeon, torch 2.13): trains until the loss drops 10x
def test_overfits_four_samples(base_config, four_samples, tmp_path):
    cfg = config_from_dict(
        base_config(
            train={"steps": 600, "batch_size": 4, "lr": 3e-3, "warmup_steps": 20, "schedule": "cosine"},
            output={"save_every": 600, "log_every": 50},
        )
    )
    cfg.data.path = str(four_samples / "data.jsonl")
    # the first record says "The image shows a red circle."; sampling uses "A red circle." -> drop the prefix
    cfg.data.caption_prefix_drop = 1.0
    trainer = Trainer(cfg)
    before = eval_loss(trainer)
    base = OmniGen2Pipeline.from_pretrained(cfg.model.pretrained)
    base.set_progress_bar_config(disable=True)
    mse_before = sample_mse(base, four_samples)
    trainer.fit()
    after = eval_loss(trainer)
    assert before / after >= 10, (before, after)
    pipe = OmniGen2Pipeline.from_pretrained(export(cfg.output.dir, tmp_path / "exported", weights="raw"))
    pipe.set_progress_bar_config(disable=True)
    mse_after = sample_mse(pipe, four_samples)
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)


@pytest.mark.slow  # 16 s on 2 idle CPU cores
def test_learns_to_follow_the_prompt(base_config, four_samples, tmp_path):
    """Two images that differ only by their prompt: after training, the model's estimate of the clean latents
    from nearly pure noise must be far better with the right prompt than with the other one. (The overfitting
    test above cannot see a model that ignores its text: the mean image also moves towards every target.)"""
    data = tmp_path / "two.jsonl"
    records = [
        {"task_type": "t2i", "instruction": "a red circle", "output_image": str(four_samples / "img" / "0.png")},
        {"task_type": "t2i", "instruction": "a blue square", "output_image": str(four_samples / "img" / "1.png")},
    ]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = config_from_dict(
        base_config(
            data={"path": str(data)},
            train={"steps": 400, "batch_size": 4, "lr": 2e-3, "warmup_steps": 20, "schedule": "constant"},
            objective={"time_shift": "fixed", "shift_factor": 3.0},
            output={"save_every": 10**6},
        )
    )
    trainer = Trainer(cfg)
    trainer.fit()
    pipe, model = trainer.pipe, trainer.transformer.eval()
    x1 = trainer._latents(
        [ImageSpec(str(four_samples / "img" / f"{i}.png"), 4096, None, 16, "t") for i in (0, 1)], [None] * 2
    )
    emb, mask = pipe.encode_text(["a red circle", "a blue square"], 64, "cpu")
    g = torch.Generator().manual_seed(0)
    t = 0.05
    xt = [t * x + (1 - t) * torch.randn(x.shape, generator=g) for x in x1]

    def error(text, text_mask):
        with torch.no_grad():
            v = model(xt, torch.full((2,), t), text, None, text_mask, None)
        return [float((x + (1 - t) * u - y).square().mean()) for x, u, y in zip(xt, v, x1)]

    right, swapped = error(emb, mask), error(emb[[1, 0]], mask[[1, 0]])
    # Answering with the other image costs ``apart``; a model that ignores the prompt answers with the mean of
    # the two for both prompts, and its error does not change when they are swapped.
    apart = float((x1[0] - x1[1]).square().mean())
    assert all(w - r > 0.5 * apart for r, w in zip(right, swapped)), (right, swapped, apart)


def test_resume_continues_the_same_run(base_config, tmp_path):
    raw = base_config(
        train={"steps": 6, "batch_size": 2, "lr": 2e-3, "ema_decay": 0.9},
        data={"prompt_dropout": 0.3, "ref_image_dropout": 0.5},
    )
    full = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'a'}"]))
    full.fit()
    first = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'b'}"]))
    first.fit(max_steps=3)  # "interrupted" after the step-2 checkpoint and one more step
    second = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'b'}"]))
    assert second.resume("latest") and second.step == 2
    second.fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    # step 3, logged before the "interruption", is dropped on resume and logged again: one line per step
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and len(a) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    for (k, p), q in zip(full.transformer.state_dict().items(), second.transformer.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), k
    for k in full.ema.shadow:
        assert torch.allclose(full.ema.shadow[k], second.ema.shadow[k], atol=1e-6)


def first_step_gradients(trainer: Trainer):
    """Run one optimizer step and capture the gradients it applied."""
    captured, step = {}, trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in trainer.named.items() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    loss = trainer.train_step()["loss"]
    trainer.optimizer.step = step
    return loss, captured


def test_gradient_accumulation_averages(base_config, tmp_path):
    """Two micro-batches of 1 give the gradient of one batch of 2 (the original sums instead)."""
    one = Trainer(
        config_from_dict(
            base_config(train={"batch_size": 2, "grad_accum": 1, "max_grad_norm": 0.0}),
            [f"output.dir={tmp_path / 'a'}"],
        )
    )
    two = Trainer(
        config_from_dict(
            base_config(train={"batch_size": 1, "grad_accum": 2, "max_grad_norm": 0.0}),
            [f"output.dir={tmp_path / 'b'}"],
        )
    )
    (la, ga), (lb, gb) = first_step_gradients(one), first_step_gradients(two)
    assert abs(la - lb) < 1e-6
    assert ga.keys() == gb.keys()
    scale = max(g.abs().max().item() for g in ga.values())
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5 * scale), k
    assert [one.train_step()["loss"] for _ in range(2)] == pytest.approx(
        [two.train_step()["loss"] for _ in range(2)], abs=1e-4
    )


@pytest.mark.slow  # 8-10 s each on 2 idle CPU cores: two `accelerate launch` processes
@pytest.mark.parametrize("precondition_text", [False, True])
def test_two_processes_match_one(base_config, tmp_path, precondition_text):
    import yaml

    train = {"steps": 3, "batch_size": 1, "lr": 2e-3, "precondition_text": precondition_text}
    raw = base_config(train=train, output={"dir": str(tmp_path / "two")})
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "omnigen2.cli",
        "train",
        str(tmp_path / "cfg.yml"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    single = Trainer(config_from_dict(raw, ["train.batch_size=2", f"output.dir={tmp_path / 'one'}"]))
    single.fit()
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    saved = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    # The gradient norm before clipping exposes any error in how the loss is normalised across processes
    # (Adam's updates would hide a constant factor).
    norms = [
        [json.loads(line)["grad_norm"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    ]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    state = single.transformer.state_dict()
    if precondition_text:  # the trained parameter is V (weight = V @ A); checkpoints hold the weight
        state = precondition.released(state, single.preconditioner)
    assert set(state) == set(saved)
    for k, v in state.items():  # all-reduce order: ~3e-5 after 3 Adam steps of 2e-3
        assert torch.allclose(v, saved[k], atol=1e-4), k
    if precondition_text:  # every process trained with the preconditioner estimated from the same texts
        A = load_file(str(tmp_path / "two" / "preconditioner.safetensors"))["A"]
        assert torch.allclose(A, single.preconditioner, rtol=1e-5, atol=1e-6)


def test_lora_save_load_merge(base_config, tmp_path):
    cfg = config_from_dict(base_config(train={"mode": "lora", "steps": 4, "lr": 2e-2}, lora={"rank": 4, "alpha": 8.0}))
    trainer = Trainer(cfg)
    trainable = {k for k, p in trainer.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    assert {k.split(".lora_")[0].split(".")[-1] for k in trainable} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    trainer.fit()
    out = export(cfg.output.dir, tmp_path / "pipe")  # base weights + pytorch_lora_weights.safetensors
    lora_file = out / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(lora_file)))
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)

    pipe = OmniGen2Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        prompt="A red circle.",
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="pt",
        latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
    )
    base = pipe(**kw).images
    pipe.load_lora_weights(out)
    with_lora = pipe(**kw).images
    assert (with_lora - base).abs().max() > 1e-4  # the adapter changes the output
    pipe.set_lora_scale(0.0)
    assert torch.allclose(pipe(**kw).images, base, atol=1e-6)
    pipe.set_lora_scale(1.0)
    pipe.fuse_lora()
    assert torch.allclose(pipe(**kw).images, with_lora, atol=1e-5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert torch.allclose(pipe(**kw).images, base, atol=1e-6)

    merged = OmniGen2Pipeline.from_pretrained(export(cfg.output.dir, tmp_path / "merged", merge_lora=True))
    merged.set_progress_bar_config(disable=True)
    assert torch.allclose(merged(**kw).images, with_lora, atol=1e-5)

    # ComfyUI-style keys: diffusion_model. prefix, lora_down/lora_up, per-module alpha
    sd = load_file(str(lora_file))
    comfy = {}
    for k, v in sd.items():
        k2 = "diffusion_model." + k[len("transformer.") :]
        comfy[k2.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")] = v
        if ".lora_A." in k:
            comfy[k2.replace(".lora_A.weight", ".alpha")] = torch.tensor(8.0)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    pipe.load_lora_weights(tmp_path / "comfy.safetensors", adapter_name="comfy")
    assert torch.allclose(pipe(**kw).images, with_lora, atol=1e-5)


def test_ema_is_exported(base_config, tmp_path):
    cfg = config_from_dict(base_config(train={"steps": 4, "lr": 5e-3, "ema_decay": 0.5}))
    trainer = Trainer(cfg)
    trainer.fit()
    ema_pipe = OmniGen2Pipeline.from_pretrained(export(cfg.output.dir, tmp_path / "ema"))
    raw_pipe = OmniGen2Pipeline.from_pretrained(export(cfg.output.dir, tmp_path / "raw", weights="raw"))
    k = "layers.0.attn.to_q.weight"
    assert torch.equal(ema_pipe.transformer.state_dict()[k], trainer.ema.shadow[k])
    assert torch.equal(raw_pipe.transformer.state_dict()[k], trainer.transformer.state_dict()[k])
    assert not torch.equal(trainer.ema.shadow[k], trainer.transformer.state_dict()[k])


def test_token_embedding_rows(base_config, four_samples, tmp_path):
    data = tmp_path / "img.jsonl"
    data.write_text(
        json.dumps(
            {
                "task_type": "t2i",
                "instruction": "Draw <|img|> a red circle.",
                "output_image": str(four_samples / "img" / "0.png"),
            }
        )
        + "\n"
    )
    cfg = config_from_dict(
        base_config(train={"steps": 3, "lr": 1e-2, "train_token_embeddings": ["<|img|>"]}, data={"path": str(data)})
    )
    trainer = Trainer(cfg)
    before = trainer.pipe.mllm.get_input_embeddings().weight.detach().clone()
    trainer.fit()
    pipe = OmniGen2Pipeline.from_pretrained(export(cfg.output.dir, tmp_path / "out", weights="raw"))
    after = pipe.mllm.get_input_embeddings().weight.detach()
    img_id = pipe.tokenizer.convert_tokens_to_ids("<|img|>")
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [img_id]


def test_chat_images_condition_as_the_chat_pipeline_draws(base_config, four_samples):
    """A data.chat_images sample is conditioned on exactly the states the chat pipeline draws that turn from
    (its input images shown to the MLLM); the batch's other samples keep the instruction-only encoding."""
    from omnigen2 import OmniGen2ChatPipeline
    from omnigen2.pipelines.pipeline_chat import IMG_TOKEN

    trainer = Trainer(config_from_dict(base_config(data={"generation_prompt_prob": 1.0, "chat_images": True})))
    step = next(s for s in range(50) if sum(trainer.data.batch(s, range(2), load=False)["chat_images"]) == 1)
    batch = trainer.data.batch(step, range(2), load=False)
    hidden, mask = trainer._text(batch)  # (2, T, D), (2, T)
    chat = OmniGen2ChatPipeline(trainer.pipe)
    for i, flagged in enumerate(batch["chat_images"]):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        if flagged:
            images = [Image.open(r.path).convert("RGB") for r in batch["refs"][i]]
            out = chat(
                batch["instructions"][i],
                input_images=images,
                assistant_prefix=IMG_TOKEN,
                num_inference_steps=1,
                height=64,
                width=64,
                text_guidance_scale=1.0,
            )
            chat.reset()
            assert out.prompt_embeds.shape[1] == n
            torch.testing.assert_close(hidden[i, :n], out.prompt_embeds[0].float(), rtol=0, atol=1e-6)
        else:
            ids, m = batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
            with torch.no_grad():
                ref = trainer.pipe.mllm(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(hidden[i, :n], ref[0, :n].float(), rtol=0, atol=1e-5)
    assert torch.isfinite(trainer.micro_loss(batch, step, 1.0)[0])


def test_config_errors(base_config):
    with pytest.raises(ValueError, match="unknown config key"):
        config_from_dict(base_config(train={"learning_rate": 1.0}))
    with pytest.raises(ValueError, match="train.mode"):
        config_from_dict(base_config(train={"mode": "qlora"}))
    with pytest.raises(ValueError, match="must be a number"):
        config_from_dict(base_config(), ["train.lr=fast"])
    cfg = config_from_dict(base_config(), ["train.lr=3e-4", "lora.target_modules=[to_q]", "train.steps=7"])
    assert cfg.train.lr == 3e-4 and cfg.lora.target_modules == ["to_q"] and cfg.train.steps == 7


def test_cli_train_and_export(base_config, tmp_path):
    import yaml

    from omnigen2.cli import main

    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(base_config(train={"steps": 2})))
    assert main(["train", str(tmp_path / "cfg.yml"), "--set", f"output.dir={tmp_path / 'r'}"]) == 0
    assert main(["export", str(tmp_path / "r"), "-o", str(tmp_path / "p"), "--sampling", "num_inference_steps=7"]) == 0
    pipe = OmniGen2Pipeline.from_pretrained(tmp_path / "p")
    assert pipe.sampling_defaults == {"num_inference_steps": 7}
