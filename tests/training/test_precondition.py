"""train.precondition_text: the caption projection trained through a whitening of its inputs computes the same
function, saves and exports the released layout, resumes exactly, and learns badly conditioned inputs faster."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from omnigen2 import OmniGen2Pipeline
from omnigen2.training import Trainer, config_from_dict, export, precondition
from omnigen2.training import trainer as trainer_module

CAPTION = precondition.CAPTION_WEIGHT


@pytest.fixture(autouse=True)
def few_texts(monkeypatch):
    monkeypatch.setattr(trainer_module, "PRECONDITION_TEXTS", 16)  # the tiny MLLM's states are 32-wide


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_inverse_sqrt_moment_whitens():
    g = torch.Generator().manual_seed(0)
    common = 10 * torch.randn(16, generator=g)
    x = common + 0.05 * torch.randn(4000, 16, generator=g)  # every vector nearly the same direction
    A = precondition.inverse_sqrt_moment(x, eps_ratio=1e-8)
    y = x @ A  # A is symmetric
    assert torch.allclose(y.T @ y / len(y), torch.eye(16), atol=2e-3)
    with pytest.raises(ValueError, match="at least 16"):
        precondition.inverse_sqrt_moment(x[:8])


def test_same_function_released_layout_and_export(base_config, tmp_path):
    raw = base_config(train={"steps": 4, "batch_size": 2, "lr": 2e-3, "ema_decay": 0.5})
    plain = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'plain'}"]))
    pre = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'pre'}", "train.precondition_text=true"]))
    assert pre.preconditioner is not None and precondition._PARAM in pre.named and CAPTION not in pre.named
    # 1. The same model at the start: the loss of a batch is the plain trainer's
    batch = plain.data.batch(10**6, range(0, 2))
    with torch.no_grad():
        a, b = plain.micro_loss(batch, 10**6, 1.0)[1], pre.micro_loss(batch, 10**6, 1.0)[1]
    assert abs(a.item() - b.item()) <= 1e-6 * max(1.0, abs(a.item()))
    # 2. Trained, it moves differently, and checkpoints hold the released keys only
    plain.fit()
    pre.fit()
    ck = sorted((tmp_path / "pre" / "checkpoints").iterdir())[-1]
    for name in ("trainable", "ema"):
        keys = set(load_file(str(ck / f"{name}.safetensors")))
        assert keys == set(plain.transformer.state_dict()), name
    w_pre = pre.transformer.time_caption_embed.caption_embedder[1].weight.detach()
    w_plain = plain.transformer.time_caption_embed.caption_embedder[1].weight.detach()
    assert (w_pre - w_plain).abs().max() > 1e-4
    # 3. The export is a plain pipeline computing what the trainer's model computes
    exported = OmniGen2Pipeline.from_pretrained(export(tmp_path / "pre", tmp_path / "raw", weights="raw"))
    assert torch.allclose(exported.transformer.state_dict()[CAPTION], w_pre, atol=1e-6)
    assert (tmp_path / "pre" / precondition.FILE).is_file()


def test_resume_continues_the_same_run(base_config, tmp_path):
    raw = base_config(
        train={"steps": 6, "batch_size": 2, "lr": 2e-3, "ema_decay": 0.9, "precondition_text": True},
        data={"prompt_dropout": 0.3},
    )
    full = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'a'}"]))
    full.fit()
    Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'b'}"])).fit(max_steps=3)
    second = Trainer(config_from_dict(raw, [f"output.dir={tmp_path / 'b'}"]))
    assert torch.equal(second.preconditioner, full.preconditioner)  # the run's own, read back
    assert second.resume("latest") and second.step == 2
    second.fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 6  # the step-3 line of the first try was dropped on resume
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    for k in full.ema.shadow:
        assert torch.allclose(full.ema.shadow[k], second.ema.shadow[k], atol=1e-6), k


def test_refused_with_lora(base_config):
    with pytest.raises(ValueError, match="train.mode 'full'"):
        Trainer(config_from_dict(base_config(train={"mode": "lora", "precondition_text": True})))


def test_learns_a_badly_conditioned_direction_faster():
    """The reason for the option: inputs that share one large direction and differ by a small one (as the
    miniature MLLM's states of 'a blue square' and 'a purple square' do). Adam on the plain weight reads the
    small difference slowly; on V with weight = V @ A it reads it at once."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(32, generator=g)
    words = 0.05 * torch.randn(6, 32, generator=g)  # six "words" along small directions
    x = common + words  # (6, 32)
    target = torch.eye(6)  # tell the six apart

    def fit(A: torch.Tensor | None) -> float:
        torch.manual_seed(1)
        layer = torch.nn.Linear(32, 6)
        if A is not None:
            precondition.attach_to_linear(layer, A)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        for _ in range(100):
            loss = (layer(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    plain = fit(None)
    whitened = fit(precondition.inverse_sqrt_moment(x.repeat(10, 1) + 1e-3 * torch.randn(60, 32, generator=g)))
    assert whitened < 0.2 * plain, (plain, whitened)
