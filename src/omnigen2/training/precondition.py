"""A whitened training parameterisation of the caption projection (``train.precondition_text``).

The transformer reads the text through ``time_caption_embed.caption_embedder``: RMSNorm, then a linear layer.
The frozen MLLM's last hidden states can be badly conditioned for that layer: on the Shapes miniature most of
their energy lies in a few directions shared by every prompt (the template, the token position), and the words
that differ between prompts move them by a few percent ("a blue square" and "a purple square" differ by 5% of
the state's norm at the colour word, 1% at the shape word; docs/notes/transformer.md, "The colours the conditioning
hides"). Gradient steps on the plain weight learn such small directions slowly, so the model kept confusing the
colours whose states are closest.

Training instead updates V with ``weight = V @ A``, where ``A = (M + eps)^(-1/2)`` and M is the second moment
of the layer's inputs over training texts: in V's coordinates every input direction has unit energy, as a
whitening of the inputs would give, but the model computes exactly the same function (the weight is folded
back to the released layout in every checkpoint and export, so nothing outside training changes). The
parameterisation wraps the model from outside (``torch.nn.utils.parametrize``); the model code is untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

# The caption projection's weight: the parameter preconditioned, in the released layout.
CAPTION_WEIGHT = "time_caption_embed.caption_embedder.1.weight"
_PARAM = "time_caption_embed.caption_embedder.1.parametrizations.weight.original"
FILE = "preconditioner.safetensors"


class Whitened(nn.Module):
    """``weight = V @ A`` for a fixed symmetric positive-definite ``A`` (D_in, D_in)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A.float())
        self.register_buffer("A_inv", torch.linalg.inv(A.double()).float())

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        return V @ self.A.to(V.dtype)  # (D_out, D_in)

    def right_inverse(self, W: torch.Tensor) -> torch.Tensor:
        return W @ self.A_inv.to(W.dtype)


def inverse_sqrt_moment(inputs: torch.Tensor, eps_ratio: float = 1e-3) -> torch.Tensor:
    """``(M + eps I)^(-1/2)`` for M = the uncentred second moment of ``inputs`` (N, D); eps is ``eps_ratio``
    times M's mean eigenvalue, so that directions the texts never use are not blown up without bound."""
    x = inputs.double().reshape(-1, inputs.shape[-1])
    if x.shape[0] < x.shape[1]:
        raise ValueError(f"need at least {x.shape[1]} input vectors to estimate the preconditioner, got {x.shape[0]}")
    moment = x.T @ x / x.shape[0]  # (D, D)
    eigvals, eigvecs = torch.linalg.eigh(moment)
    eps = eps_ratio * eigvals.mean()
    return (eigvecs @ torch.diag((eigvals.clamp_min(0) + eps).rsqrt()) @ eigvecs.T).float()


@torch.no_grad()
def caption_inputs(transformer, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inputs of the caption projection for MLLM states ``text`` (B, L, D) at the tokens of ``mask`` (B, L):
    the states through the caption RMSNorm, (N, D)."""
    norm = transformer.time_caption_embed.caption_embedder[0]
    return norm(text.float())[mask.bool()]


def attach(transformer, A: torch.Tensor) -> None:
    """Train the caption projection through ``weight = V @ A``; the computed function is unchanged."""
    attach_to_linear(transformer.time_caption_embed.caption_embedder[1], A)


def attach_to_linear(linear: nn.Linear, A: torch.Tensor) -> None:
    if parametrize.is_parametrized(linear, "weight"):
        raise ValueError("the layer is already preconditioned")
    parametrize.register_parametrization(linear, "weight", Whitened(A.to(linear.weight.device)))


def released(state: dict[str, torch.Tensor], A: torch.Tensor) -> dict[str, torch.Tensor]:
    """A state dict (or EMA shadow) of the preconditioned model -> the released layout: the parameter V folded
    into ``weight = V @ A``, the parametrisation's buffers dropped."""
    out = {}
    for k, v in state.items():
        if k == _PARAM:
            out[CAPTION_WEIGHT] = (v.double() @ A.double().to(v.device)).to(v.dtype)
        elif ".parametrizations." not in k:
            out[k] = v
    return out


def parametrized(state: dict[str, torch.Tensor], A: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of :func:`released` on the trained parameters: ``weight`` -> V = weight @ A^-1."""
    out = dict(state)
    if CAPTION_WEIGHT in out:
        W = out.pop(CAPTION_WEIGHT)
        out[_PARAM] = (W.double() @ torch.linalg.inv(A.double())).to(W.dtype)
    return out


def save(directory: Path, A: torch.Tensor) -> None:
    save_file({"A": A.detach().float().cpu().contiguous()}, str(Path(directory) / FILE))


def load(directory: Path) -> torch.Tensor | None:
    path = Path(directory) / FILE
    return load_file(str(path))["A"] if path.is_file() else None
