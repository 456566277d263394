"""Pre-training the frozen parts of the miniature: the VAE (reconstruction) and the MLLM (understanding).

Both loops take a ``batch(step)`` callable, so the data is a pure function of the step (resumable,
reproducible) and can be rendered on the fly instead of stored.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..pipelines.pipeline_omnigen2 import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

# The original chat pipeline uses the generation system prompt for every turn, understanding included.
UNDERSTANDING_SYSTEM_PROMPT = SYSTEM_PROMPT


def image_placeholder(index: int, num_tokens: int) -> str:
    """The original chat pipeline's image slot: ``<imgN>: <|vision_start|><|image_pad|>...<|vision_end|>``."""
    return f"<img{index}>: <|vision_start|>" + "<|image_pad|>" * num_tokens + "<|vision_end|>"


def _lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _fit(module, loss_at: Callable[[int], torch.Tensor], steps: int, opt, sched, name: str, log_every: int):
    """The shared loop: loss, backward, clip at 1.0, AdamW step, schedule step; returns the loss history."""
    history = []
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


def edge_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W) pixel weights: 1, plus ``weight`` within a pixel of an edge of the target image."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True)  # (B, 1, H, W-1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)  # (B, 1, H-1, W)
    edges = F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 0, 1)) > 0.1
    edges = F.max_pool2d(edges.float(), 3, stride=1, padding=1)  # (B, 1, H, W), dilated by one pixel
    return 1 + weight * edges


def train_vae(
    vae,
    batch: Callable[[int], torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    edge_weight: float = 4.0,
    warmup: int = 100,
    log_every: int = 100,
) -> list[float]:
    """Train an AutoencoderKL on images in [-1, 1]: L1 + MSE reconstruction, weighted up near edges, and a
    small KL term.

    Afterwards ``vae.config.shift_factor`` / ``scaling_factor`` are set from the latent statistics, so the
    transformer sees roughly unit-variance, zero-mean latents (the released VAE stores the same fields)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, warmup))
    vae.train()

    def loss_at(step: int) -> torch.Tensor:
        x = batch(step)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        w = edge_weights(x, edge_weight)  # small details (dots, the arms of crosses) live at edges
        return (w * ((rec - x).abs() + (rec - x) ** 2)).mean() + kl_weight * dist.kl().mean()

    history = _fit(vae, loss_at, steps, opt, sched, "vae", log_every)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(batch(10**6 + k)).latent_dist.mode() for k in range(8)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return history


@torch.no_grad()
def vae_reconstruction_error(vae, batch: Callable[[int], torch.Tensor], n: int = 8) -> dict[str, float]:
    """Mean absolute and squared error of encode(mean) -> decode, in [0, 1] pixel units, on held-out batches."""
    l1 = l2 = 0.0
    for k in range(n):
        x = batch(2 * 10**6 + k)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        l1 += ((rec - x).abs().mean() / 2).item()
        l2 += (((rec - x) / 2) ** 2).mean().item()
    return {"l1": l1 / n, "mse": l2 / n}


class UnderstandingBatcher:
    """Turns (images, question, answer) triples into Qwen2.5-VL training inputs, loss on the answer only.

    ``images`` is one PIL image, a list of 0-5 of them, or None; they enter the user turn with the original
    chat template's ``<imgN>: <|vision_start|>...<|vision_end|>`` slots, before the question."""

    def __init__(self, tokenizer, image_processor, merge_size: int = 2):
        self.tok, self.proc, self.merge = tokenizer, image_processor, merge_size
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def prompt(self, question: str, num_tokens: int | list[int]) -> str:
        counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
        slots = "".join(image_placeholder(i + 1, n) for i, n in enumerate(counts))
        messages = [
            {"role": "system", "content": UNDERSTANDING_SYSTEM_PROMPT},
            {"role": "user", "content": slots + question},
        ]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def vision(self, images: list) -> tuple[dict, list[int]]:
        """Processor outputs of a flat image list and the number of visual tokens of each image."""
        if not images:
            return {}, []
        vis = self.proc(images=images, return_tensors="pt")
        per_image = (vis["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        return {"pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}, per_image

    def __call__(self, triples) -> dict[str, torch.Tensor]:
        groups = [[] if im is None else list(im) if isinstance(im, list | tuple) else [im] for im, _, _ in triples]
        vis, per_image = self.vision([im for g in groups for im in g])
        ids, labels, k = [], [], 0
        for g, (_, question, answer) in zip(groups, triples):
            p = self.tok(self.prompt(question, per_image[k : k + len(g)]), add_special_tokens=False).input_ids
            k += len(g)
            a = self.tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, L)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
            **vis,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
        }


def train_mllm(
    model, batch: Callable[[int], dict], steps: int, lr: float = 2e-3, warmup: int = 100, log_every: int = 50
) -> list[float]:
    """Next-token cross-entropy on the answers, for the parameters that require gradients (the MLLM is frozen
    afterwards)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, warmup))
    model.train()
    t0 = time.perf_counter()
    history = _fit(model, lambda step: model(**batch(step)).loss, steps, opt, sched, "mllm", log_every)
    model.eval()
    logger.info("mllm: %d steps in %.0fs", steps, time.perf_counter() - t0)
    return history


def new_vision_tower(model, depth: int, vision_hidden: int):
    """A copy of a trained Qwen2.5-VL with a fresh vision tower of ``depth`` blocks of width ``vision_hidden``
    and its language model frozen (only ``model.visual`` trains).

    The transformer is conditioned on the language model's hidden states of text-only prompts, which never pass
    through the vision tower: retraining the tower improves what the MLLM sees without changing a single number
    of that conditioning."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .mini import vision_config

    config = copy.deepcopy(model.config)
    patch = config.vision_config.patch_size
    fresh = vision_config(config.text_config.hidden_size, depth, vision_hidden, patch)
    config.vision_config = type(config.vision_config)(**fresh)
    new = Qwen2_5_VLForConditionalGeneration(config)
    keep = {k: v for k, v in model.state_dict().items() if not k.startswith("model.visual.")}
    missing, unexpected = new.load_state_dict(keep, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing), (missing, unexpected)
    for name, p in new.named_parameters():
        p.requires_grad_(name.startswith("model.visual."))
    return new


@torch.no_grad()
def answer(model, batcher: UnderstandingBatcher, image, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to a question about zero or more images (special tokens such as ``<|img|>`` kept)."""
    images = [] if image is None else list(image) if isinstance(image, list | tuple) else [image]
    vis, per_image = batcher.vision(images)
    ids = batcher.tok(batcher.prompt(question, per_image), add_special_tokens=False, return_tensors="pt").input_ids
    stops = [batcher.tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|img|>", "<|endoftext|>")]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **vis,
        mm_token_type_ids=(ids == batcher.image_token_id).int(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=batcher.tok.pad_token_id,
    )
    text = batcher.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
    return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
