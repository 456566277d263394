"""Attention in one place: one function, an explicit backend, a clear error when a backend is missing.

Every attention call of the OmniGen2 transformer goes through :func:`varlen_attention`: sequences of
different lengths are packed into one (T, H, D) stream (:class:`Segments` marks where each starts), and each
attends only to itself. No compute is spent on padding. :func:`attention` is the same choice of kernels
for a padded batch with a key mask (outputs at padded query positions are arbitrary).

Backends
--------
``"sdpa"``          ``torch.nn.functional.scaled_dot_product_attention``, one call per packed sequence
                    (padded: one call with a boolean key mask); PyTorch picks its flash / memory-efficient /
                    math kernel.
``"math"``          the plain softmax(QK^T)V in float32: the reference the others are checked against.
``"flash_varlen"``  ``flash_attn.flash_attn_varlen_func`` over the packed stream in one call (CUDA,
                    fp16/bf16).
``"auto"``          ``flash_varlen`` when flash-attn is installed and the tensors are fp16/bf16 on CUDA,
                    otherwise ``sdpa``. Resolved per call from the tensors, never at import time.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "flash_varlen")


@dataclass
class Segments:
    """Packed sequences: rows [cu_seqlens[i], cu_seqlens[i + 1]) of a (T, ...) stream form sequence i."""

    lens: list[int]  # tokens per sequence, on the host (no device sync to split the stream)
    cu_seqlens: torch.Tensor  # (N + 1,) int32 on the stream's device, as flash-attn takes it
    owner: torch.Tensor  # (T,) long: the batch sample each token belongs to (per-sample modulation)

    @property
    def max_len(self) -> int:
        return max(self.lens)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(name: str) -> str:
    """Validate a backend name; raise a clear error if it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash_varlen" and not flash_attn_available():
        raise ImportError("attention backend 'flash_varlen' needs the flash-attn package: pip install flash-attn")
    return name


def resolve_backend(name: str, q: torch.Tensor) -> str:
    if name != "auto":
        return name
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash_varlen"
    return "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    backend: str = "auto",
    seq_lens: list[int] | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention with grouped key/value heads.

    Args:
        q: (B, S, Hq, D) queries.
        k, v: (B, S, Hkv, D) keys and values; Hq must be a multiple of Hkv.
        key_mask: (B, S) bool, True for real tokens (real tokens first in every row), or None.
        backend: one of :data:`BACKENDS`.
        seq_lens: per-row count of real tokens, if known on the host (avoids a device sync for flash_varlen).

    Returns:
        (B, S, Hq, D) attention outputs.
    """
    backend = resolve_backend(backend, q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "flash_varlen":
        return _flash_varlen(q, k, v, key_mask, scale, seq_lens)

    groups = q.shape[2] // k.shape[2]
    q_bhsd = q.transpose(1, 2)  # (B, Hq, S, D)
    # Repeat kv heads explicitly: the original does the same, and enable_gqa falls back to the math kernel
    # on several PyTorch versions.
    k_bhsd = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, Hq, S, D)
    v_bhsd = v.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, Hq, S, D)
    mask_b11s = None if key_mask is None else key_mask.view(key_mask.shape[0], 1, 1, -1)  # (B, 1, 1, S)

    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, attn_mask=mask_b11s, scale=scale)
    elif backend == "math":
        scores = (q_bhsd.float() @ k_bhsd.float().transpose(-1, -2)) * scale  # (B, H, S, S)
        if mask_b11s is not None:
            scores = scores.masked_fill(~mask_b11s, float("-inf"))
        out = (scores.softmax(dim=-1) @ v_bhsd.float()).to(q.dtype)
    else:
        raise ValueError(f"unknown attention backend {backend!r}")
    return out.transpose(1, 2)  # (B, S, Hq, D)


def _flash_varlen(q, k, v, key_mask, scale, seq_lens):
    from flash_attn import flash_attn_varlen_func  # imported only when this backend is asked for

    b, s, hq, d = q.shape
    if key_mask is None:
        key_mask = torch.ones(b, s, dtype=torch.bool, device=q.device)
    if seq_lens is None:
        seq_lens = key_mask.sum(dim=1).tolist()
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=q.device)
    cu_seqlens = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    idx = key_mask.flatten().nonzero().squeeze(1)  # (T,) positions of real tokens
    q_thd = q.reshape(b * s, hq, d)[idx]  # (T, Hq, D)
    k_thd = k.reshape(b * s, k.shape[2], d)[idx]  # (T, Hkv, D)
    v_thd = v.reshape(b * s, v.shape[2], d)[idx]  # (T, Hkv, D)
    max_len = max(seq_lens)
    out_thd = flash_attn_varlen_func(
        q_thd, k_thd, v_thd, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=False
    )  # (T, Hq, D)
    out = q.new_zeros(b * s, hq, d)
    out[idx] = out_thd
    return out.view(b, s, hq, d)


def varlen_attention(q, k, v, segs: Segments, backend: str = "auto", q_segs: Segments | None = None):
    """Non-causal attention within each packed sequence.

    Args:
        q: (T_q, Hq, D) queries of all sequences, concatenated; k, v: (T, Hkv, D), Hq a multiple of Hkv.
        segs: where each sequence's keys start and end.
        backend: one of :data:`BACKENDS`.
        q_segs: where each sequence's queries start and end, when only some rows ask (default: ``segs``).

    Returns:
        (T_q, Hq, D).
    """
    q_segs = segs if q_segs is None else q_segs
    backend = resolve_backend(backend, q)
    if backend == "flash_varlen":
        from flash_attn import flash_attn_varlen_func  # imported only when this backend is asked for

        # flash-attn takes grouped kv heads directly (the original repeats them: same result)
        return flash_attn_varlen_func(
            q,
            k,
            v,
            q_segs.cu_seqlens,
            segs.cu_seqlens,
            q_segs.max_len,
            segs.max_len,
            dropout_p=0.0,
            softmax_scale=q.shape[-1] ** -0.5,
        )
    if len(segs.lens) == 1:
        return attention(q[None], k[None], v[None], None, backend)[0]
    outs = [
        attention(qs[None], ks[None], vs[None], None, backend)[0]  # (n, Hq, D): one sequence, no padding
        for qs, ks, vs in zip(q.split(q_segs.lens), k.split(segs.lens), v.split(segs.lens))
    ]
    return torch.cat(outs)  # (T_q, Hq, D)
