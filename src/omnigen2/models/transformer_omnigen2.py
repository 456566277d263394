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

Caches (TeaCache, TaylorSeer) wrap stage 4 from outside (see ``omnigen2.acceleration``); the model code has
one path.
"""

from __future__ import annotations

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

from .attention import attention, check_backend

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
    """Look up (cos, sin), each (B, S, head_dim // 2) float32, for integer positions (B, S, 3)."""
    parts = [table.to(pos_ids.device)[pos_ids[..., i].long()] for i, table in enumerate(freqs_cis)]
    rot = torch.cat(parts, dim=-1)  # (B, S, D/2) complex128
    return rot.real.float(), rot.imag.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, S, H, D) by angles given as cos/sin (B, S, D/2).

    Computed in float32 (the original upcasts too) and cast back to x's dtype.
    """
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, H, D/2, 2)
    re, im = x_pairs.unbind(-1)  # (B, S, H, D/2) each
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, D/2)
    out = torch.stack((re * c - im * s, re * s + im * c), dim=-1)  # (B, S, H, D/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, S, H, D)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seq_lens=None):
        b, s, _ = x.shape
        q = self.norm_q(self.to_q(x).view(b, s, self.heads, self.head_dim))  # (B, S, H, D)
        k = self.norm_k(self.to_k(x).view(b, s, self.kv_heads, self.head_dim))  # (B, S, Hkv, D)
        v = self.to_v(x).view(b, s, self.kv_heads, self.head_dim)  # (B, S, Hkv, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask, self.backend, seq_lens)  # (B, S, H, D)
        return self.to_out[0](out.reshape(b, s, self.heads * self.head_dim))


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
        return self.linear_2(F.silu(self.linear_1(x)) * self.linear_3(x))


class RMSNormZero(nn.Module):
    """RMS norm whose scale and the block's gates come from the timestep embedding (adaLN-zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(min(dim, 1024), 4 * dim, bias=True)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)  # 4 x (B, C)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


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

    def forward(self, x, mask, rope, temb=None, seq_lens=None):
        if self.modulation:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        else:  # the context refiner: no timestep, unit gates
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x), None, None, None
        attn_out = self.norm2(self.attn(h, mask, rope, seq_lens))
        x = x + (attn_out if gate_msa is None else gate_msa.unsqueeze(1).tanh() * attn_out)
        h = self.ffn_norm1(x)
        mlp_out = self.ffn_norm2(self.feed_forward(h if scale_mlp is None else h * (1 + scale_mlp.unsqueeze(1))))
        return x + (mlp_out if gate_mlp is None else gate_mlp.unsqueeze(1).tanh() * mlp_out)


class TimestepCaptionEmbedding(nn.Module):
    def __init__(self, hidden_size: int, text_feat_dim: int, norm_eps: float, timestep_scale: float):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=min(hidden_size, 1024))
        self.caption_embedder = nn.Sequential(
            nn.RMSNorm(text_feat_dim, eps=norm_eps), nn.Linear(text_feat_dim, hidden_size, bias=True)
        )

    def forward(self, timestep, text_hidden_states, dtype):
        temb = self.timestep_embedder(self.time_proj(timestep).to(dtype))  # (B, min(C, 1024))
        return temb, self.caption_embedder(text_hidden_states)  # (B, L, C)


class OutputNorm(nn.Module):
    """Adaptive LayerNorm (scale only, from temb) followed by the patch projection."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(min(dim, 1024), dim, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear_1(F.silu(temb).to(x.dtype))  # (B, C)
        return self.linear_2(self.norm(x) * (1 + scale)[:, None, :])


# ----------------------------------------------------------------------------------------------------------
# Sequence layout: everything about a forward that depends only on shapes and text lengths
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SequenceLayout:
    """Token counts, masks and RoPE angles of one batch. Step-invariant: build once per generation and branch."""

    cap_lens: list[int]  # real text tokens per sample
    ref_sizes: list[list[tuple[int, int]]]  # per sample: latent (H, W) of each reference image
    ref_lens: list[list[int]]  # per sample: tokens of each reference image
    img_sizes: list[tuple[int, int]]  # per sample: latent (H, W) of the target
    img_lens: list[int]
    seq_lens: list[int]  # text + references + target
    text_len: int  # padded text length
    text_mask: torch.Tensor  # (B, L) bool
    img_mask: torch.Tensor  # (B, max img_len) bool
    ref_mask: torch.Tensor | None  # (N_ref, max ref_len) bool, one row per reference image
    joint_mask: torch.Tensor  # (B, max seq_len) bool
    text_rope: tuple[torch.Tensor, torch.Tensor]
    img_rope: tuple[torch.Tensor, torch.Tensor]
    ref_rope: tuple[torch.Tensor, torch.Tensor] | None
    joint_rope: tuple[torch.Tensor, torch.Tensor]
    pos_ids: torch.Tensor  # (B, max seq_len, 3) Omni-RoPE positions (sequence/image id, row, col)

    @property
    def num_refs(self) -> int:
        return sum(len(r) for r in self.ref_lens)


def _grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w, device=device).repeat(h)  # (h*w,)
    return rows, cols


def build_layout(
    freqs_cis: list[torch.Tensor],
    cap_lens: list[int],
    text_len: int,
    ref_sizes: list[list[tuple[int, int]]],
    img_sizes: list[tuple[int, int]],
    patch_size: int,
    device: torch.device,
) -> SequenceLayout:
    """Omni-RoPE positions and masks for [text | references | target] per sample (sizes in latent pixels)."""
    p = patch_size
    ref_lens = [[(h // p) * (w // p) for h, w in sizes] for sizes in ref_sizes]
    img_lens = [(h // p) * (w // p) for h, w in img_sizes]
    seq_lens = [c + sum(r) + i for c, r, i in zip(cap_lens, ref_lens, img_lens)]
    b, max_seq = len(cap_lens), max(seq_lens)

    pos = torch.zeros(b, max_seq, 3, dtype=torch.long, device=device)  # (B, S, 3) = (seq/image id, row, col)
    for i in range(b):
        c = cap_lens[i]
        pos[i, :c] = torch.arange(c, device=device)[:, None]  # text: (t, t, t)
        shift, start = c, c
        for (h, w), n in zip(list(ref_sizes[i]) + [img_sizes[i]], ref_lens[i] + [img_lens[i]]):
            rows, cols = _grid(h // p, w // p, device)
            pos[i, start : start + n, 0] = shift
            pos[i, start : start + n, 1] = rows
            pos[i, start : start + n, 2] = cols
            shift += max(h // p, w // p)
            start += n
    for axis, table in enumerate(freqs_cis):
        top = int(pos[..., axis].max())  # host values: the layout is built once per generation
        if top >= table.shape[0]:
            raise ValueError(
                f"RoPE position {top} on axis {axis} exceeds axes_lens[{axis}] = {table.shape[0]} "
                "(text tokens use positions (i, i, i) on all three axes): shorten the prompt or the images"
            )
    cos, sin = gather_rope(freqs_cis, pos)  # (B, S, D/2) each

    def pick(spans: list[tuple[int, int, int]], rows: int, width: int):
        """Copy [start, start+n) of sample i's angles into row r, for (i, start, n) in spans."""
        out_c = cos.new_zeros(rows, width, cos.shape[-1])
        out_s = sin.new_zeros(rows, width, sin.shape[-1])
        mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
        for r, (i, start, n) in enumerate(spans):
            out_c[r, :n], out_s[r, :n], mask[r, :n] = cos[i, start : start + n], sin[i, start : start + n], True
        return (out_c, out_s), mask

    text_rope, text_mask = pick([(i, 0, cap_lens[i]) for i in range(b)], b, text_len)
    img_rope, img_mask = pick([(i, cap_lens[i] + sum(ref_lens[i]), img_lens[i]) for i in range(b)], b, max(img_lens))
    ref_spans = []
    for i in range(b):
        start = cap_lens[i]
        for n in ref_lens[i]:
            ref_spans.append((i, start, n))
            start += n
    ref_rope, ref_mask = (None, None)
    if ref_spans:
        ref_rope, ref_mask = pick(ref_spans, len(ref_spans), max(n for _, _, n in ref_spans))
    joint_mask = torch.arange(max_seq, device=device)[None, :] < torch.tensor(seq_lens, device=device)[:, None]
    return SequenceLayout(
        cap_lens=list(cap_lens),
        ref_sizes=[list(s) for s in ref_sizes],
        ref_lens=ref_lens,
        img_sizes=list(img_sizes),
        img_lens=img_lens,
        seq_lens=seq_lens,
        text_len=text_len,
        text_mask=text_mask,
        img_mask=img_mask,
        ref_mask=ref_mask,
        joint_mask=joint_mask,
        text_rope=text_rope,
        img_rope=img_rope,
        ref_rope=ref_rope,
        joint_rope=(cos, sin),
        pos_ids=pos,
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

    def build_layout(self, text_attention_mask, ref_sizes, img_sizes, freqs_cis=None, cap_lens=None):
        """Layout for a batch; ``cap_lens`` (host ints) avoids reading the mask back from the device."""
        if cap_lens is None:
            cap_lens = text_attention_mask.sum(dim=1).tolist()
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
        )

    # -- stages ---------------------------------------------------------------------------------------------

    def patchify(self, images: list[torch.Tensor], rows: int | None = None) -> torch.Tensor:
        """[(C, H, W)] -> zero-padded tokens (N, rows, p*p*C), channel fastest as in the released weights."""
        p = self.config.patch_size
        seqs = [
            img.unflatten(1, (-1, p)).unflatten(3, (-1, p)).permute(1, 3, 2, 4, 0).flatten(0, 1).flatten(1)
            for img in images
        ]  # each (h*w, p*p*C) from (C, h*p, w*p)
        rows = rows or max(s.shape[0] for s in seqs)
        out = seqs[0].new_zeros(len(seqs), rows, seqs[0].shape[1])
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
        return out

    def unpatchify(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(h*w, p*p*C) -> (C, h*p, w*p)."""
        p, (h, w) = self.config.patch_size, size
        return (
            tokens.view(h // p, w // p, p, p, self.out_channels).permute(4, 0, 2, 1, 3).reshape(self.out_channels, h, w)
        )

    def embed(self, timestep, text_hidden_states, dtype):
        """Stage 1: (temb, caption tokens)."""
        return self.time_caption_embed(timestep, text_hidden_states, dtype)

    def refine_context(self, text_tokens: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Stage 3a: the context refiner. It has no timestep input, so its output is step-invariant."""
        for blk in self.context_refiner:
            text_tokens = blk(text_tokens, layout.text_mask, layout.text_rope)
        return text_tokens

    def refine_images(self, latents, ref_latents, temb, layout: SequenceLayout):
        """Stage 3b: embed + refine the target and the reference images. Returns (B, max img, C), (N_ref, max, C)."""
        x = self.x_embedder(self.patchify(latents, max(layout.img_lens)))  # (B, max_img, C)
        for blk in self.noise_refiner:
            x = self._block(blk, x, layout.img_mask, layout.img_rope, temb)
        refs = None
        if layout.num_refs:
            flat = [r for sample in ref_latents for r in (sample or [])]
            refs = self.ref_image_patch_embedder(self.patchify(flat, layout.ref_mask.shape[1]))  # (N_ref, max, C)
            index = torch.tensor([j for r in layout.ref_lens for j in range(len(r))], device=refs.device)
            refs = refs + self.image_index_embedding[index][:, None, :]  # tag the k-th image of each sample
            owner = torch.tensor([i for i, r in enumerate(layout.ref_lens) for _ in r], device=temb.device)
            ref_temb = temb[owner]  # (N_ref, C_t)
            for blk in self.ref_image_refiner:
                refs = self._block(blk, refs, layout.ref_mask, layout.ref_rope, ref_temb)
        return x, refs

    def assemble(self, text_tokens, img_tokens, ref_tokens, layout: SequenceLayout) -> torch.Tensor:
        """Stage 3c: concatenate [text | references | target] per sample into (B, max seq, C), zero padded."""
        b, c = len(layout.seq_lens), img_tokens.shape[-1]
        joint = img_tokens.new_zeros(b, max(layout.seq_lens), c)
        r = 0
        for i in range(b):
            pos = layout.cap_lens[i]
            joint[i, :pos] = text_tokens[i, :pos]
            for n in layout.ref_lens[i]:
                joint[i, pos : pos + n] = ref_tokens[r, :n]
                pos, r = pos + n, r + 1
            joint[i, pos : pos + layout.img_lens[i]] = img_tokens[i, : layout.img_lens[i]]
        return joint

    def run_layers(self, hidden: torch.Tensor, temb: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        """Stage 4: the joint blocks. Step caches replace this call."""
        for blk in self.layers:
            hidden = self._block(blk, hidden, layout.joint_mask, layout.joint_rope, temb, layout.seq_lens)
        return hidden

    def head(self, hidden: torch.Tensor, temb: torch.Tensor, layout: SequenceLayout) -> list[torch.Tensor]:
        """Stage 5: output norm + projection, then the target tokens of each sample back to (C, H, W)."""
        hidden = self.norm_out(hidden, temb)  # (B, S, p*p*C_out)
        return [
            self.unpatchify(hidden[i, s - n : s], size)
            for i, (s, n, size) in enumerate(zip(layout.seq_lens, layout.img_lens, layout.img_sizes))
        ]

    def _block(self, blk, x, mask, rope, temb, seq_lens=None):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(blk, x, mask, rope, temb, seq_lens)
        return blk(x, mask, rope, temb, seq_lens)

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

        Beyond the original: ``layout`` (from :meth:`build_layout`) skips rebuilding masks and RoPE angles;
        ``step_cache`` (see ``omnigen2.acceleration``) holds one guidance branch's state across the steps of a
        generation: it reuses the refined text and may replace the joint blocks (TeaCache, TaylorSeer)."""
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

        # 1. Condition: timestep and caption embeddings
        temb, text_tokens = self.embed(timestep, text_hidden_states, latents[0].dtype)

        # 2-3. Refine text and images, assemble [text | references | target] (called lazily: a cache may skip it)
        def prepare() -> torch.Tensor:
            context = cache.context if cache.context is not None else self.refine_context(text_tokens, layout)
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
