"""The OmniGen2 diffusion transformer (Lumina-Image-2.0 style), with the released checkpoint's key names.

Data flow of one forward (shapes for batch B, hidden size C, patch p):
  1. condition   timestep -> temb (B, min(C, 1024)); text hidden states -> caption tokens (B, L, C)
  2. layout      Omni-RoPE positions for [text | ref image 1 | ... | ref image n | target image]:
                 text token i sits at (i, i, i); image k sits at (shift_k, row, col), each image restarting
                 its 2-D grid at (0, 0) and shift_k advancing by the image's larger side in tokens.
  3. refine      context refiner (text only, no modulation), noise refiner (target image), reference-image
                 refiner (each reference image alone, tagged with its image-index embedding)
  4. joint       the joint blocks over the concatenated sequence, modulated by temb
  5. head        adaptive layer norm + projection, unpatchify the target image tokens

Every stage runs on a packed ("varlen") stream: the real tokens of all samples concatenated into one (T, C)
tensor, attention restricted to each sample's segment. No compute is spent on padding, and several guidance
branches evaluate in one call (see :class:`SequenceLayout`).

Caches (TeaCache, TaylorSeer) wrap stage 4 from outside (see ``omnigen2.acceleration``); the model code has
one path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_rotary_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from .attention import Segments, check_backend, varlen_attention

MAX_REF_IMAGES = 5  # rows of image_index_embedding in the released checkpoint

# Named transformer sizes. "full" is the released OmniGen2 transformer (~4B parameters);
# "tiny" is the shared parity fixture; "mid" is the ~40M benchmark size of the performance issue.
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        patch_size=2,
        in_channels=16,
        hidden_size=2520,
        num_layers=32,
        num_refiner_layers=2,
        num_attention_heads=21,
        num_kv_heads=7,
        multiple_of=256,
        axes_dim_rope=(40, 40, 40),
        axes_lens=(1024, 1664, 1664),
        text_feat_dim=2048,
        timestep_scale=1000.0,
    ),
    "mid": dict(
        patch_size=2,
        in_channels=16,
        hidden_size=384,
        num_layers=8,
        num_refiner_layers=2,
        num_attention_heads=6,
        num_kv_heads=3,
        multiple_of=64,
        axes_dim_rope=(16, 24, 24),
        axes_lens=(2048, 1024, 1024),
        text_feat_dim=256,
        timestep_scale=1000.0,
    ),
    "tiny": dict(
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(2048, 1024, 1024),
        text_feat_dim=32,
        timestep_scale=1000.0,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Rotary embedding (Omni-RoPE)
# ----------------------------------------------------------------------------------------------------------


def get_freqs_cis(axes_dim, axes_lens, theta: float = 10000.0) -> list[torch.Tensor]:
    """Per-axis complex RoPE tables, (axes_lens[i], axes_dim[i] // 2), in float64 as the original builds them."""
    return [get_1d_rotary_pos_embed(d, n, theta=theta, freqs_dtype=torch.float64) for d, n in zip(axes_dim, axes_lens)]


def gather_rope(freqs_cis: list[torch.Tensor], pos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Look up (cos, sin), each (..., head_dim // 2) float32, for integer positions (..., 3)."""
    parts = [table.to(pos_ids.device)[pos_ids[..., i].long()] for i, table in enumerate(freqs_cis)]
    rot = torch.cat(parts, dim=-1)  # (..., D/2) complex128
    return rot.real.float(), rot.imag.float()


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(T, D/2) angles -> the (T, 1, D/2) complex64 rotations :func:`apply_rope` multiplies with (built once)."""
    return torch.complex(cos, sin).unsqueeze(-2)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (T, H, D) by the complex rotations ``rot`` (T, 1, D/2).

    One complex64 product per pair, (re*c - im*s, re*s + im*c) in float32: the original's formula (it upcasts
    to float32 too), in a single pass. Cast back to x's dtype.
    """
    x_c = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (T, H, D/2) complex64
    return torch.view_as_real(x_c * rot).flatten(-2).to(x.dtype)  # (T, H, D)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query self-attention with per-head RMS q/k norm and RoPE (diffusers' key names)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(heads * self.head_dim, dim, bias=False)])
        self.backend = "auto"

    def forward(self, x: torch.Tensor, segs: Segments, rope, out: tuple | None = None) -> torch.Tensor:
        """x: (T, C) packed tokens; ``out`` = (rows, Stage of those rows): queries for those rows only."""
        t = x.shape[0]
        xq, rope_q, q_segs = (x, rope, segs) if out is None else (x[out[0]], out[1].rope, out[1].segs)
        q = self.norm_q(self.to_q(xq).view(xq.shape[0], self.heads, self.head_dim))  # (T_q, H, D)
        k = self.norm_k(self.to_k(x).view(t, self.kv_heads, self.head_dim))  # (T, Hkv, D)
        v = self.to_v(x).view(t, self.kv_heads, self.head_dim)  # (T, Hkv, D)
        q, k = apply_rope(q, rope_q), apply_rope(k, rope)
        attn = varlen_attention(q, k, v, segs, self.backend, q_segs)  # (T_q, H, D)
        return self.to_out[0](attn.reshape(xq.shape[0], self.heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP; the inner size is rounded up to a multiple of ``multiple_of`` (Lumina convention)."""

    def __init__(self, dim: int, inner_dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        if ffn_dim_multiplier is not None:
            inner_dim = int(ffn_dim_multiplier * inner_dim)
        inner_dim = multiple_of * ((inner_dim + multiple_of - 1) // multiple_of)
        self.linear_1 = nn.Linear(dim, inner_dim, bias=False)
        self.linear_2 = nn.Linear(inner_dim, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place into silu's fresh output (silu's backward reads its input, not this buffer)
        return self.linear_2(F.silu(self.linear_1(x)).mul_(self.linear_3(x)))


class RMSNormZero(nn.Module):
    """RMS norm whose scale and the block's gates come from the timestep embedding (adaLN-zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(min(dim, 1024), 4 * dim, bias=True)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, owner: torch.Tensor | None = None):
        """x: (T, C) packed tokens; temb: (1, C_t) shared by all tokens, or (B, C_t) with ``owner`` (T,) giving
        each token's sample. Returns the modulated x and the three other (1 or B, C) modulation vectors."""
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=-1)  # 4 x (B, C)
        return self.norm(x) * (1 + per_token(scale_msa, owner)), gate_msa, scale_mlp, gate_mlp


def per_token(v: torch.Tensor, owner: torch.Tensor | None) -> torch.Tensor:
    """A (1, C) vector broadcasts over a packed stream; (B, C) per-sample vectors are gathered to (T, C)."""
    return v if v.shape[0] == 1 else v[owner]


class TransformerBlock(nn.Module):
    """Pre/post-normed attention + SwiGLU; with ``modulation`` the norms and residual gates follow temb."""

    def __init__(self, dim, heads, kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, modulation: bool):
        super().__init__()
        self.modulation = modulation
        self.attn = Attention(dim, heads, kv_heads, eps=1e-5)
        self.feed_forward = FeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
        self.norm1 = RMSNormZero(dim, norm_eps) if modulation else nn.RMSNorm(dim, eps=norm_eps)
        self.norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)

    def forward(self, x, segs: Segments, rope, temb=None, out=None):
        """x: (T, C) packed tokens of the sequences in ``segs``; rope: (T, 1, D/2) rotations. ``out`` = (rows, Stage of
        those rows): return only those rows (keys and values still see every token)."""
        out_owner = segs.owner if out is None else out[1].segs.owner
        if self.modulation:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb, segs.owner)
            gate_msa, scale_mlp, gate_mlp = (per_token(v, out_owner) for v in (gate_msa, scale_mlp, gate_mlp))
        else:  # the context refiner: no timestep, unit gates
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x), None, None, None
        attn_out = self.norm2(self.attn(h, segs, rope, out))  # (T_out, C)
        x = x if out is None else x[out[0]]
        x = x + attn_out if gate_msa is None else torch.addcmul(x, gate_msa.tanh(), attn_out)  # one pass
        h = self.ffn_norm1(x)
        mlp_out = self.ffn_norm2(self.feed_forward(h if scale_mlp is None else h * (1 + scale_mlp)))
        return x + mlp_out if gate_mlp is None else torch.addcmul(x, gate_mlp.tanh(), mlp_out)


class TimestepCaptionEmbedding(nn.Module):
    def __init__(self, hidden_size: int, text_feat_dim: int, norm_eps: float, timestep_scale: float):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=min(hidden_size, 1024))
        self.caption_embedder = nn.Sequential(
            nn.RMSNorm(text_feat_dim, eps=norm_eps), nn.Linear(text_feat_dim, hidden_size, bias=True)
        )

    def forward(self, timestep, text_hidden_states, dtype):
        return self.embed_time(timestep, dtype), self.caption_embedder(text_hidden_states)

    def embed_time(self, timestep, dtype):
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))  # (B, min(C, 1024))


class OutputNorm(nn.Module):
    """Adaptive LayerNorm (scale only, from temb) followed by the patch projection."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(min(dim, 1024), dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))  # (B, C)
        return self.linear_2(self.norm(x) * (1 + per_token(scale, owner)))  # x: (T, C) packed tokens


# ----------------------------------------------------------------------------------------------------------
# Sequence layout: everything about a forward that depends only on shapes and text lengths
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One packed stage: its sequences and their RoPE rotations (T, 1, D/2) from :func:`rope_tables`."""

    segs: Segments
    rope: torch.Tensor


@dataclass
class SequenceLayout:
    """Token counts, packing indices and RoPE tables of one batch. Step-invariant: build once per generation.

    All stages are packed streams. The joint stream holds, per sample in order, [text | references | target];
    the refiner stages hold the real text tokens, the distinct reference images and the distinct targets.
    Samples may share a target or references (``img_groups`` / ``ref_groups`` of :func:`build_layout`: the
    guidance branches of one image); a shared one is embedded and refined once. Its RoPE angles then come from
    the first sample of the group; the refiners attend within one image, whose tokens share the first Omni-RoPE
    axis, so the shift of that axis cancels in q.k and the refined tokens are the same for every sample.
    """

    cap_lens: list[int]  # real text tokens per sample
    ref_sizes: list[list[tuple[int, int]]]  # per sample: latent (H, W) of each reference image
    ref_lens: list[list[int]]  # per sample: tokens of each reference image
    img_sizes: list[tuple[int, int]]  # per sample: latent (H, W) of the target
    img_lens: list[int]
    seq_lens: list[int]  # text + references + target
    text_len: int  # padded text length of the input
    text_index: torch.Tensor  # (T_txt,) rows of the flattened (B * L) text that are real tokens
    text: Stage  # context refiner: one sequence per sample
    img_rows: list[int]  # the sample whose latents each distinct target is taken from
    img: Stage  # noise refiner: one sequence per distinct target
    ref_items: list[tuple[int, int]]  # (sample, k) of each distinct reference image
    ref_image_ids: torch.Tensor | None  # (T_ref,) k of the image each reference token belongs to
    ref: Stage | None  # reference refiner: one sequence per distinct reference image
    joint_index: torch.Tensor  # (T,) rows of cat([text, references, targets]) forming the joint stream
    joint: Stage  # joint blocks: one sequence per sample
    out_index: torch.Tensor  # (T_out,) joint rows of each sample's target tokens, samples in order
    out: Stage  # the target tokens: the only rows of the last joint block that are read
    pos_ids: list[torch.Tensor]  # per sample (seq_len, 3) Omni-RoPE positions (sequence/image id, row, col)

    @property
    def num_refs(self) -> int:
        return len(self.ref_items)


def _grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w, device=device).repeat(h)  # (h*w,)
    return rows, cols


def make_segments(lens: list[int], owners: list[int], device) -> Segments:
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)  # (N + 1,)
    owner = torch.tensor([o for o, n in zip(owners, lens) for _ in range(n)], dtype=torch.long, device=device)
    return Segments(lens=list(lens), cu_seqlens=cu, owner=owner)


def _sample_positions(cap_len: int, image_sizes: list[tuple[int, int]], p: int, device) -> torch.Tensor:
    """Omni-RoPE positions (S, 3) of one sample's [text | image 1 | ... | image n] (the target image last):
    text token t at (t, t, t); image k at (shift_k, row, col), its grid restarting at (0, 0) and shift_k
    advancing by the previous image's larger side in tokens, from the text length."""
    lens = [(h // p) * (w // p) for h, w in image_sizes]
    pos = torch.zeros(cap_len + sum(lens), 3, dtype=torch.long, device=device)
    pos[:cap_len] = torch.arange(cap_len, device=device)[:, None]  # text: (t, t, t)
    shift, start = cap_len, cap_len
    for (h, w), n in zip(image_sizes, lens):
        rows, cols = _grid(h // p, w // p, device)
        pos[start : start + n, 0] = shift
        pos[start : start + n, 1] = rows
        pos[start : start + n, 2] = cols
        shift += max(h // p, w // p)
        start += n
    return pos


@dataclass(frozen=True)
class PositionTable:
    """What the RoPE tables hold, in the terms of ``_sample_positions``: a sample fits when every position is
    below ``axes_lens`` on its axis. Images are measured in pixels, ``token_px`` to a token side (the VAE's
    downsampling x the patch size). The pipeline checks a call and indexing checks a training record with it,
    so what it accepts never reaches ``_check_rope_range``."""

    axes_lens: tuple[int, int, int]
    token_px: int

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of tokens of an image of ``size`` = (height, width) pixels."""
        return size[0] // self.token_px, size[1] // self.token_px

    def image_fits(self, size: tuple[int, int]) -> bool:
        rows, cols = self.grid(size)
        return rows <= self.axes_lens[1] and cols <= self.axes_lens[2]

    def text_room(self, ref_sizes: list[tuple[int, int]]) -> int:
        """The most text tokens a sample with input images of ``ref_sizes`` can take: the target image sits on
        axis 0 at text + the inputs' longer sides, and text token t at (t, t, t) on every axis."""
        refs = sum(max(self.grid(size)) for size in ref_sizes)
        return min(self.axes_lens[0] - 1 - refs, *self.axes_lens[1:])


def _check_rope_range(freqs_cis: list[torch.Tensor], pos: torch.Tensor) -> None:
    for axis, table in enumerate(freqs_cis):
        top = int(pos[:, axis].max())  # host values: the layout is built once per generation
        if top >= table.shape[0]:
            raise ValueError(
                f"RoPE position {top} on axis {axis} exceeds axes_lens[{axis}] = {table.shape[0]} "
                "(text tokens use positions (i, i, i) on all three axes): shorten the prompt or the images"
            )


@dataclass
class _RefPacking:
    """The reference refiner's stream: one sequence per distinct reference image, in order of the first sample
    of each group; ``offset[group]``: the group's first row in that stream."""

    items: list[tuple[int, int]]  # (sample, k)
    rows: list[int]  # rows of the joint stream the tokens take their RoPE angles from
    seq_lens: list[int]
    owners: list[int]
    image_ids: list[int]  # per token: k
    offset: dict


def _pack_refs(cap_lens, ref_lens, ref_groups, starts) -> _RefPacking:
    packing = _RefPacking([], [], [], [], [], {})
    for i, lens in enumerate(ref_lens):
        if not lens or ref_groups[i] in packing.offset:
            continue
        packing.offset[ref_groups[i]] = sum(packing.seq_lens)
        pos = starts[i] + cap_lens[i]
        for k, n in enumerate(lens):
            packing.items.append((i, k))
            packing.rows += range(pos, pos + n)
            packing.seq_lens.append(n)
            packing.owners.append(i)
            packing.image_ids += [k] * n
            pos += n
    return packing


def _pack_targets(img_lens, img_groups, starts) -> tuple[list[int], list[int], dict]:
    """The noise refiner's stream: the sample of each distinct target, their joint-stream rows, and each
    group's first row in the stream."""
    samples, rows, offset = [], [], {}
    for i, n in enumerate(img_lens):
        if img_groups[i] not in offset:
            offset[img_groups[i]] = len(rows)
            samples.append(i)
            rows += range(starts[i + 1] - n, starts[i + 1])
    return samples, rows, offset


def _joint_rows(cap_lens, ref_lens, img_lens, refs: _RefPacking, ref_groups, img_offset, img_groups) -> list[int]:
    """Rows of cat([text (T_txt), references (T_ref), targets (T_img)]) in [text | refs | target] per sample."""
    n_txt, n_ref = sum(cap_lens), len(refs.rows)
    rows, txt_pos = [], 0
    for i, (c, r, n) in enumerate(zip(cap_lens, ref_lens, img_lens)):
        rows += range(txt_pos, txt_pos + c)
        txt_pos += c
        if r:
            off = n_txt + refs.offset[ref_groups[i]]
            rows += range(off, off + sum(r))
        off = n_txt + n_ref + img_offset[img_groups[i]]
        rows += range(off, off + n)
    return rows


def build_layout(
    freqs_cis: list[torch.Tensor],
    cap_lens: list[int],
    text_len: int,
    ref_sizes: list[list[tuple[int, int]]],
    img_sizes: list[tuple[int, int]],
    patch_size: int,
    device: torch.device,
    img_groups: list[int] | None = None,
    ref_groups: list[int | None] | None = None,
) -> SequenceLayout:
    """Omni-RoPE positions and packing for [text | references | target] per sample (sizes in latent pixels).

    ``img_groups[i]`` / ``ref_groups[i]``: samples with equal ids share the same target latents / the same list
    of reference latents (the caller guarantees it); each distinct one is refined once. Default: all distinct.
    """
    p, b = patch_size, len(cap_lens)
    img_groups = list(range(b)) if img_groups is None else list(img_groups)
    ref_groups = list(range(b)) if ref_groups is None else list(ref_groups)
    ref_lens = [[(h // p) * (w // p) for h, w in sizes] for sizes in ref_sizes]
    img_lens = [(h // p) * (w // p) for h, w in img_sizes]
    seq_lens = [c + sum(r) + i for c, r, i in zip(cap_lens, ref_lens, img_lens)]
    starts = [0, *itertools.accumulate(seq_lens)]  # each sample's first row in the joint stream

    # 1. Positions of the joint stream and their RoPE angles
    pos_ids = [_sample_positions(c, [*r, s], p, device) for c, r, s in zip(cap_lens, ref_sizes, img_sizes)]
    all_pos = torch.cat(pos_ids)  # (T, 3)
    _check_rope_range(freqs_cis, all_pos)
    cos, sin = gather_rope(freqs_cis, all_pos)  # (T, D/2) each

    index = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # (len(rows),) row indices

    def stage(rows: list[int], lens: list[int], owners: list[int]) -> Stage:
        idx = index(rows)
        return Stage(make_segments(lens, owners, device), rope_tables(cos[idx], sin[idx]))

    # 2. The refiners' streams: the real text tokens of each sample, the distinct references and targets
    text_rows = [starts[i] + j for i in range(b) for j in range(cap_lens[i])]
    text_index = torch.tensor([i * text_len + j for i in range(b) for j in range(cap_lens[i])], device=device)
    refs = _pack_refs(cap_lens, ref_lens, ref_groups, starts)
    img_samples, img_rows, img_offset = _pack_targets(img_lens, img_groups, starts)

    # 3. The joint stream, and the rows of its targets (the only ones the last block computes)
    joint_rows = _joint_rows(cap_lens, ref_lens, img_lens, refs, ref_groups, img_offset, img_groups)
    out_rows = [r for i in range(b) for r in range(starts[i + 1] - img_lens[i], starts[i + 1])]
    return SequenceLayout(
        cap_lens=list(cap_lens),
        ref_sizes=[list(s) for s in ref_sizes],
        ref_lens=ref_lens,
        img_sizes=list(img_sizes),
        img_lens=img_lens,
        seq_lens=seq_lens,
        text_len=text_len,
        text_index=text_index,
        text=stage(text_rows, cap_lens, list(range(b))),
        img_rows=img_samples,
        img=stage(img_rows, [img_lens[i] for i in img_samples], img_samples),
        ref_items=refs.items,
        ref_image_ids=index(refs.image_ids) if refs.items else None,
        ref=stage(refs.rows, refs.seq_lens, refs.owners) if refs.items else None,
        joint_index=index(joint_rows),
        joint=stage(list(range(starts[-1])), seq_lens, list(range(b))),
        out_index=index(out_rows),
        out=stage(out_rows, img_lens, list(range(b))),
        pos_ids=pos_ids,
    )


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class OmniGen2Transformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """OmniGen2's diffusion transformer. Config fields and state-dict keys are those of the released checkpoint."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _skip_layerwise_casting_patterns = ["x_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 2304,
        num_layers: int = 26,
        num_refiner_layers: int = 2,
        num_attention_heads: int = 24,
        num_kv_heads: int = 8,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        axes_dim_rope: tuple[int, int, int] = (32, 32, 32),
        axes_lens: tuple[int, int, int] = (300, 512, 512),
        text_feat_dim: int = 1024,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        if num_attention_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if hidden_size // num_attention_heads != sum(axes_dim_rope):
            raise ValueError(
                f"hidden_size // num_attention_heads ({hidden_size // num_attention_heads}) must equal "
                f"sum(axes_dim_rope) ({sum(axes_dim_rope)})"
            )
        self.out_channels = out_channels or in_channels
        patch_dim = patch_size * patch_size * in_channels

        def block(modulation: bool) -> TransformerBlock:
            return TransformerBlock(
                hidden_size, num_attention_heads, num_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, modulation
            )

        self.x_embedder = nn.Linear(patch_dim, hidden_size)
        self.ref_image_patch_embedder = nn.Linear(patch_dim, hidden_size)
        self.time_caption_embed = TimestepCaptionEmbedding(hidden_size, text_feat_dim, norm_eps, timestep_scale)
        self.noise_refiner = nn.ModuleList([block(True) for _ in range(num_refiner_layers)])
        self.ref_image_refiner = nn.ModuleList([block(True) for _ in range(num_refiner_layers)])
        self.context_refiner = nn.ModuleList([block(False) for _ in range(num_refiner_layers)])
        self.layers = nn.ModuleList([block(True) for _ in range(num_layers)])
        self.norm_out = OutputNorm(hidden_size, patch_size * patch_size * self.out_channels)
        self.image_index_embedding = nn.Parameter(torch.zeros(MAX_REF_IMAGES, hidden_size))
        self.gradient_checkpointing = False
        self._freqs_cis: list[torch.Tensor] | None = None
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> OmniGen2Transformer2DModel:
        if name not in PRESETS:
            raise ValueError(f"unknown transformer preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def position_table(self, vae_scale_factor: int) -> PositionTable:
        """The positions this model's RoPE tables hold, for images encoded by a VAE of ``vae_scale_factor``."""
        return PositionTable(tuple(self.config.axes_lens), vae_scale_factor * self.config.patch_size)

    def initialize_weights(self) -> None:
        """The original's initialisation (matters for training from scratch, not for loading)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for blk in [*self.noise_refiner, *self.ref_image_refiner, *self.layers]:
            nn.init.zeros_(blk.norm1.linear.weight)  # adaLN-zero: every block starts as identity-gated
            nn.init.zeros_(blk.norm1.linear.bias)
        emb = self.time_caption_embed
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.trunc_normal_(emb.caption_embedder[1].weight, std=0.02)
        for lin in (self.norm_out.linear_1, self.norm_out.linear_2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.image_index_embedding, std=0.02)

    # -- configuration helpers ------------------------------------------------------------------------------

    def set_attention_backend(self, backend: str) -> None:
        """Choose the attention kernel for every block: 'auto', 'sdpa', 'math' or 'flash_varlen'."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend

    def get_freqs_cis(self) -> list[torch.Tensor]:
        """The RoPE tables for this config (theta 10000), built once."""
        if self._freqs_cis is None:
            self._freqs_cis = get_freqs_cis(self.config.axes_dim_rope, self.config.axes_lens)
        return self._freqs_cis

    def build_layout(
        self, text_attention_mask, ref_sizes, img_sizes, freqs_cis=None, cap_lens=None, img_groups=None, ref_groups=None
    ):
        """Layout for a batch; ``cap_lens`` (host ints) avoids reading the mask back from the device.
        ``img_groups`` / ``ref_groups``: see :func:`build_layout` (samples sharing their target / references)."""
        if cap_lens is None:
            cap_lens = [int(n) for n in text_attention_mask.sum(dim=1).tolist()]
        if len(ref_sizes) != len(img_sizes):
            raise ValueError(f"got reference images for {len(ref_sizes)} samples but {len(img_sizes)} latents")
        for i, sizes in enumerate(ref_sizes):
            if len(sizes) > MAX_REF_IMAGES:
                raise ValueError(f"sample {i} has {len(sizes)} reference images; the model supports {MAX_REF_IMAGES}")
        return build_layout(
            freqs_cis if freqs_cis is not None else self.get_freqs_cis(),
            cap_lens,
            text_attention_mask.shape[1],
            ref_sizes,
            img_sizes,
            self.config.patch_size,
            text_attention_mask.device,
            img_groups,
            ref_groups,
        )

    # -- stages ---------------------------------------------------------------------------------------------

    def patchify(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[(C, H, W)] -> packed tokens (sum h*w, p*p*C), channel fastest as in the released weights."""
        p = self.config.patch_size
        seqs = [
            img.unflatten(1, (-1, p)).unflatten(3, (-1, p)).permute(1, 3, 2, 4, 0).flatten(0, 1).flatten(1)
            for img in images
        ]  # each (h*w, p*p*C) from (C, h*p, w*p)
        return torch.cat(seqs)

    def unpatchify(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(h*w, p*p*C) -> (C, h*p, w*p)."""
        p, (h, w) = self.config.patch_size, size
        return (
            tokens.view(h // p, w // p, p, p, self.out_channels).permute(4, 0, 2, 1, 3).reshape(self.out_channels, h, w)
        )

    def embed(self, timestep, dtype):
        """Stage 1: temb, (B, C_t), or (1, C_t) when one timestep is given for the whole batch."""
        return self.time_caption_embed.embed_time(timestep.reshape(-1), dtype)

    def refine_context(self, text_hidden_states: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Stage 3a: caption embedding + context refiner over the real text tokens, (T_txt, C). Neither has a
        timestep input, so the result is step-invariant."""
        text = text_hidden_states.flatten(0, 1)[layout.text_index]  # (T_txt, text_feat_dim)
        tokens = self.time_caption_embed.caption_embedder(text)  # (T_txt, C)
        for blk in self.context_refiner:
            tokens = self._block(blk, tokens, layout.text.segs, layout.text.rope)
        return tokens

    def refine_images(self, latents, ref_latents, temb, layout: SequenceLayout):
        """Stage 3b: embed + refine the distinct targets and reference images: (T_img, C), (T_ref, C) or None."""
        x = self.x_embedder(self.patchify([latents[i] for i in layout.img_rows]))  # (T_img, C)
        for blk in self.noise_refiner:
            x = self._block(blk, x, layout.img.segs, layout.img.rope, temb)
        refs = None
        if layout.num_refs:
            flat = [ref_latents[i][k] for i, k in layout.ref_items]
            refs = self.ref_image_patch_embedder(self.patchify(flat))  # (T_ref, C)
            refs = refs + self.image_index_embedding[layout.ref_image_ids]  # tag the k-th image of each sample
            for blk in self.ref_image_refiner:
                refs = self._block(blk, refs, layout.ref.segs, layout.ref.rope, temb)
        return x, refs

    def assemble(self, text_tokens, img_tokens, ref_tokens, layout: SequenceLayout) -> torch.Tensor:
        """Stage 3c: the joint stream, [text | references | target] per sample, (T, C)."""
        parts = [text_tokens] + ([ref_tokens] if ref_tokens is not None else []) + [img_tokens]
        return torch.cat(parts)[layout.joint_index]

    def run_layers(self, hidden: torch.Tensor, temb: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Stage 4: the joint blocks over the packed stream (T, C) -> the target tokens (T_out, C). Only those
        are read, so the last block computes queries, residual and MLP for them alone (exact: every row of a
        block is computed independently of the others but for the keys and values, which still see all).
        Step caches replace this call."""
        *body, last = self.layers
        for blk in body:
            hidden = self._block(blk, hidden, layout.joint.segs, layout.joint.rope, temb)
        return self._block(last, hidden, layout.joint.segs, layout.joint.rope, temb, (layout.out_index, layout.out))

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, layout: SequenceLayout) -> list[torch.Tensor]:
        """Stage 5: output norm + projection of the target tokens (T_out, C), each sample back to (C, H, W)."""
        out = self.norm_out(hidden, temb, layout.out.segs.owner)  # (T_out, p*p*C_out)
        return [self.unpatchify(t, size) for t, size in zip(out.split(layout.img_lens), layout.img_sizes)]

    def _block(self, blk, x, segs, rope, temb=None, out=None):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(blk, x, segs, rope, temb, out)
        return blk(x, segs, rope, temb, out)

    def forward(
        self,
        hidden_states: torch.Tensor | list[torch.Tensor],
        timestep: torch.Tensor,
        text_hidden_states: torch.Tensor,
        freqs_cis: list[torch.Tensor] | None,
        text_attention_mask: torch.Tensor,
        ref_image_hidden_states: list[list[torch.Tensor] | None] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
        layout: SequenceLayout | None = None,
        step_cache=None,
    ):
        """The original's signature: latents (B, C, H, W) or [(C, H, W)], timestep (B,) in [0, 1] (1 = clean),
        text hidden states (B, L, text_feat_dim) with a right-padded mask (B, L), and per sample an optional
        list of reference latents (C, H_k, W_k). Returns the predicted velocity (data - noise), same layout
        as the latents.

        Beyond the original: a timestep of shape (1,) applies to every sample; ``layout`` (from
        :meth:`build_layout`) skips rebuilding the packing and RoPE tables, and may declare samples that share
        their target or references (the guidance branches of one image: refined once); ``step_cache`` (see
        ``omnigen2.acceleration``) holds the state of guidance branches across the steps of a generation: it
        reuses the refined text and may replace the joint blocks (TeaCache, TaylorSeer)."""
        lora_scale = (attention_kwargs or {}).get("scale", 1.0)
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        is_tensor = isinstance(hidden_states, torch.Tensor)
        latents = list(hidden_states)  # [(C, H, W)] * B
        refs = ref_image_hidden_states if ref_image_hidden_states is not None else [None] * len(latents)
        if layout is None:
            ref_sizes = [[tuple(r.shape[-2:]) for r in (sample or [])] for sample in refs]
            layout = self.build_layout(
                text_attention_mask, ref_sizes, [tuple(x.shape[-2:]) for x in latents], freqs_cis
            )
        cache = step_cache if step_cache is not None else _NO_CACHE

        # 1. Condition: timestep embedding (the caption embedding is step-invariant: stage 3a)
        temb = self.embed(timestep, latents[0].dtype)

        # 2-3. Refine text and images, assemble [text | references | target] (called lazily: a cache may skip it)
        def prepare() -> torch.Tensor:
            context = cache.context
            if context is None:
                context = self.refine_context(text_hidden_states, layout)
            if cache.reuse_context:
                cache.context = context  # no timestep input: the same at every step of this branch
            img, ref_tokens = self.refine_images(latents, refs, temb, layout)
            return self.assemble(context, img, ref_tokens, layout)

        # 4. Joint blocks, through the step cache if one is given
        hidden = (
            cache.run(self, prepare, temb, layout)
            if step_cache is not None
            else self.run_layers(prepare(), temb, layout)
        )

        # 5. Output norm, projection, unpatchify
        output = self.head(hidden, temb, layout)
        if is_tensor:
            output = torch.stack(output, dim=0)
        if USE_PEFT_BACKEND:
            unscale_lora_layers(self, lora_scale)
        return Transformer2DModelOutput(sample=output) if return_dict else output


class _NoContextCache:
    context = None
    reuse_context = False


_NO_CACHE = _NoContextCache()
