"""OmniGen2 generation: text-to-image, instruction editing and in-context generation in one call.

The sampler follows the original ``OmniGen2Pipeline`` step for step (chat-template text encoding with the
MLLM's last-layer hidden states, VAE latents of the reference images, dual classifier-free guidance over a
step range, the size rules and the final resize), so the released weights give the original's images.
Differences are listed in docs/DEVIATIONS.md.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..acceleration import CacheConfig
from ..acceleration.caches import BranchCaches
from ..errors import LimitError
from ..images import check_image
from ..limits import Limits, check_float, check_int
from ..models.transformer_omnigen2 import MAX_REF_IMAGES, OmniGen2Transformer2DModel, SequenceLayout
from ..schedulers import make_scheduler
from .image_processor import OmniGen2ImageProcessor

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class OmniGen2PipelineOutput(BaseOutput):
    """``images``: list of PIL images, an (N, H, W, 3) array, an (N, 3, H, W) float tensor in [0, 1], or latents.
    ``computed_steps``: for each guidance branch, the steps at which the joint blocks ran (caches skip some)."""

    images: Any
    computed_steps: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Branch:
    """One guidance branch (conditional, reference-only, unconditional) with its step-invariant state."""

    name: str
    text: torch.Tensor  # (B, L, text_feat_dim)
    mask: torch.Tensor  # (B, L)
    refs: list[list[torch.Tensor] | None]
    layout: SequenceLayout
    cache: Any


@dataclass
class SamplingSettings:
    """One call's sampling settings after defaults (the call's, else the checkpoint's, else the original's)."""

    steps: int
    text_guidance: float
    image_guidance: float
    height: int | None  # None: the default size, or the input image's (align_res)
    width: int | None
    cfg_range: tuple[float, float]  # guidance applies at steps i with i / steps in this range
    cache_config: CacheConfig


@dataclass
class PromptStates:
    """Text conditioning of one call: ``batch`` prompts, each row repeated for the images per prompt."""

    batch: int
    embeds: torch.Tensor  # (B * n, L, D)
    mask: torch.Tensor  # (B * n, L), right-padded
    negative_embeds: torch.Tensor | None  # (B * n, L', D); None without text guidance
    negative_mask: torch.Tensor | None


class OmniGen2Pipeline(DiffusionPipeline):
    """Components: ``transformer`` (OmniGen2Transformer2DModel), ``vae`` (diffusers AutoencoderKL), ``scheduler``
    (flow Euler or DPM-Solver++), ``mllm`` (Qwen2_5_VLForConditionalGeneration) and ``processor`` (the Qwen
    processor, or just its tokenizer: generation needs only the tokenizer)."""

    model_cpu_offload_seq = "mllm->transformer->vae"

    def __init__(self, transformer: OmniGen2Transformer2DModel, vae, scheduler, mllm, processor):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, mllm=mllm, processor=processor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # Size rules of the original: reference images are floored to multiples of 2x the VAE factor, generated
        # sizes to multiples of 16. Both are also kept multiples of one latent patch (VAE factor x patch size),
        # which changes nothing for the released model (16 = 8 x 2) and avoids the original's crash otherwise.
        patch = self.vae_scale_factor * self.transformer.config.patch_size
        self.size_multiple = math.lcm(16, patch)
        self.image_processor = OmniGen2ImageProcessor(vae_scale_factor=math.lcm(2 * self.vae_scale_factor, patch))
        self.default_sample_size = 128
        self.cache_config = CacheConfig()
        self.limits = Limits()  # bounds on one call (omnigen2.limits): refused beyond them, before any work
        # Evaluate the guidance branches of a step in one packed transformer call (False: one call per branch,
        # as the original; same results within float rounding).
        self.batch_guidance = True
        self.sampling_defaults: dict[str, Any] = {}
        self._processor_files: dict[str, bytes] = {}  # processor/ files the tokenizer does not write itself
        self._model_index_extra: dict[str, Any] = {}
        # An optional LoRA adapter of the MLLM for judging turns (loading.load_reflection_adapter); the chat
        # pipeline switches it on only while judging, so the image conditioning never sees it.
        self.reflection_adapter: dict | None = None

    # -- loading / saving (see omnigen2.loading) -------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, torch_dtype=None, device=None, allow_pickle=False, **kwargs
    ) -> OmniGen2Pipeline:
        """Load the released layout from a directory or hub id (or ``"builtin:NAME"``); see ``omnigen2.loading``."""
        from ..loading import load_pipeline

        return load_pipeline(
            cls,
            pretrained_model_name_or_path,
            torch_dtype=torch_dtype,
            device=device,
            allow_pickle=allow_pickle,
            **kwargs,
        )

    def save_pretrained(self, save_directory, max_shard_size: str = "5GB", **_) -> None:
        """Write the released layout (model_index.json + one folder per component, safetensors)."""
        from ..loading import save_pipeline

        save_pipeline(self, save_directory, max_shard_size=max_shard_size)

    @property
    def domain(self) -> str | None:
        """What the checkpoint was trained on, when it says so: model_index.json's ``omnigen2_domain``, a name
        registered in the ``omnigen2.domains`` entry points (the bundled model: "shapes")."""
        return self._model_index_extra.get("omnigen2_domain")

    def _check_domain(self, prompts: list[str]) -> None:
        """Warn on the first prompt outside the checkpoint's domain, in the words of the domain's registered check
        (prompt -> warning text, or None for a prompt it covers)."""
        if self.domain is None:
            return
        from ..loading import resolve_named

        check = resolve_named("omnigen2_domain", self.domain)
        message = next((m for m in map(check, prompts) if m), None)
        if message:
            warnings.warn(message, stacklevel=_caller_stacklevel())

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    # -- LoRA (the original's format, or ComfyUI-style keys) ------------------------------------------------

    def load_lora_weights(self, source, adapter_name: str = "default", scale: float = 1.0) -> None:
        """Load a LoRA adapter into the transformer: a .safetensors file, a folder holding
        pytorch_lora_weights.safetensors, or a state dict."""
        from ..training.lora import read_lora

        state_dict, config = read_lora(source, self.transformer)
        self.transformer.load_lora_adapter(state_dict, prefix=None, adapter_name=adapter_name, metadata=config)
        self.transformer.set_adapters([adapter_name], weights=[scale])

    def set_lora_scale(self, scale: float, adapter_name: str = "default") -> None:
        self.transformer.set_adapters([adapter_name], weights=[scale])

    def fuse_lora(self, lora_scale: float = 1.0) -> None:
        self.transformer.fuse_lora(lora_scale=lora_scale)

    def unfuse_lora(self) -> None:
        self.transformer.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.transformer.unload_lora()

    # -- caches ---------------------------------------------------------------------------------------------

    def enable_teacache(self, rel_l1_thresh: float = 0.05) -> None:
        self.cache_config = CacheConfig(teacache=rel_l1_thresh)

    def enable_taylorseer(self) -> None:
        self.cache_config = CacheConfig(taylorseer=True)

    def disable_caches(self) -> None:
        self.cache_config = CacheConfig()

    # -- text -----------------------------------------------------------------------------------------------

    def apply_chat_template(self, prompt: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    @torch.no_grad()
    def encode_text(
        self, prompts: list[str], max_sequence_length: int | None, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-templated prompts -> the MLLM's last hidden states (B, L, D) and the right-padded mask (B, L)."""
        # Characters are bounded before tokenizing: a 200k-character prompt would otherwise take seconds to
        # tokenize only for its tail to be dropped.
        chars = self.limits.prompt_chars
        texts = [self.apply_chat_template(p[:chars]) for p in prompts]
        tok = self.tokenizer
        # Right padding always: the transformer takes the first mask.sum() tokens as the text (as the original,
        # which silently breaks with a left-padding tokenizer).
        inputs = tok(
            texts,
            padding="longest",
            padding_side="right",
            max_length=max_sequence_length,
            truncation=max_sequence_length is not None,
            return_tensors="pt",
        )
        if max_sequence_length is not None:
            full = tok(texts, padding="longest", padding_side="right", return_tensors="pt")
            self._warn_truncated(prompts, full, max_sequence_length)
        ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
        # Through the model's forward (offload hooks apply); the logits are not needed: compute one position only.
        out = self.mllm(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        return hidden.to(dtype=self.mllm.dtype), mask

    def _warn_truncated(self, prompts: list[str], full, max_length: int) -> None:
        """One short warning for the prompts cut to ``max_length`` tokens (or to ``limits.prompt_chars``
        characters): counts and the start of what was dropped, never the whole prompt."""
        lengths = full.attention_mask.sum(dim=1).tolist()  # tokens of each templated prompt
        chars = self.limits.prompt_chars
        cut = [i for i, (p, n) in enumerate(zip(prompts, lengths)) if n > max_length or len(p) > chars]
        if not cut:
            return
        i, more = cut[0], f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
        read = f"the first {chars} of its {len(prompts[i])} characters (limits.prompt_chars)"
        if lengths[i] > max_length:
            what = f"to {max_length} tokens (max_sequence_length, chat template included) from {lengths[i]}"
            what += f" in {read}" if len(prompts[i]) > chars else ""
            tail = full.input_ids[i, max_length : min(lengths[i], max_length + 20)]  # enough for the excerpt
            dropped = self.tokenizer.decode(tail, skip_special_tokens=True)
        else:
            what, dropped = f"to {read}", prompts[i][chars:]
        excerpt = dropped[:40] + ("..." if len(dropped) > 40 else "")
        warnings.warn(
            f"prompt {i}{more} truncated {what}; the dropped text begins {excerpt!r}",
            stacklevel=_caller_stacklevel(),
        )

    # -- images ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(
        self,
        images: list[PIL.Image.Image],
        max_pixels: int,
        max_side_length: int | None,
        generator: torch.Generator | None = None,
        sample: bool = False,
    ) -> list[torch.Tensor]:
        """Reference images -> scaled VAE latents [(C, h, w)]. The posterior mean by default (the original samples
        without a generator, which makes its runs unrepeatable); ``sample=True`` samples with ``generator``."""
        latents = []
        for img in images:
            pixels = self.image_processor.preprocess_reference(img, max_pixels, max_side_length)
            dist = self.vae.encode(pixels.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            latents.append(self._scale_latents(z).squeeze(0))
        return latents

    def _scale_latents(self, z):
        cfg = self.vae.config
        if cfg.shift_factor is not None:
            z = z - cfg.shift_factor
        if cfg.scaling_factor is not None:
            z = z * cfg.scaling_factor
        return z.to(self.vae.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], (N, 3, H, W)."""
        cfg = self.vae.config
        latents = latents.to(self.vae.dtype)
        if cfg.scaling_factor is not None:
            latents = latents / cfg.scaling_factor
        if cfg.shift_factor is not None:
            latents = latents + cfg.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def _normalize_images(self, input_images, batch: int) -> list[list[PIL.Image.Image]]:
        """Accept None, a list of images (one prompt) or a list of lists (one per prompt)."""
        if input_images is None:
            return [[] for _ in range(batch)]
        if isinstance(input_images, PIL.Image.Image):
            input_images = [input_images]
        if not isinstance(input_images, (list, tuple)):
            raise TypeError(f"input_images must be a list of PIL images, got {type(input_images).__name__}")
        nested = len(input_images) > 0 and all(isinstance(x, (list, tuple)) or x is None for x in input_images)
        per_prompt = [list(x or []) for x in input_images] if nested else [list(input_images)]
        if len(per_prompt) == 1 and batch > 1:
            per_prompt = per_prompt * batch
        if len(per_prompt) != batch:
            raise ValueError(f"input_images has {len(per_prompt)} entries for {batch} prompts")
        bound = min(self.limits.input_images, MAX_REF_IMAGES)
        for i, imgs in enumerate(per_prompt):
            if len(imgs) > bound:
                raise LimitError(f"prompt {i} has {len(imgs)} input images; OmniGen2 takes at most {bound}")
            per_prompt[i] = [check_image(im, name=f"input image {j} of prompt {i}") for j, im in enumerate(imgs)]
        return per_prompt

    # -- sizes ----------------------------------------------------------------------------------------------

    def _output_size(self, height, width, images, align_res: bool, max_pixels: int, max_side_length):
        """(generation size, final size), before any work. One input image per prompt with ``align_res`` sets the
        size (the first one's, as its VAE latents will have it); else the requested size is scaled under
        ``max_pixels`` and floored to a multiple of the latent patch."""
        refs = [imgs for imgs in images if imgs]
        if align_res and refs and all(len(r) == 1 for r in refs):
            h, w = self.image_processor.target_size(refs[0][0].height, refs[0][0].width, max_pixels, max_side_length)
            self.limits.check("output_pixels", h * w, f"the input image's size {w}x{h} = {h * w} pixels")
            return (h, w), (h, w)
        default = self.default_sample_size * self.vae_scale_factor
        height = default if height is None else height  # None: unset (0 was refused in stage 1)
        width = default if width is None else width
        ratio = min((max_pixels / (height * width)) ** 0.5, 1.0)
        m = self.size_multiple
        gen = (int(height * ratio) // m * m, int(width * ratio) // m * m)
        if min(gen) < m:
            raise ValueError(f"requested size {width}x{height} is below one latent patch ({m} pixels) per side")
        self._check_grid(gen, f"the requested size height={height} x width={width}, generated at {gen[1]}x{gen[0]}")
        if gen != (height, width):
            warnings.warn(
                f"generating at {gen[1]}x{gen[0]} (sides multiples of {m}, at most max_pixels={max_pixels}) and "
                f"resizing the result to the requested {width}x{height}",
                stacklevel=_caller_stacklevel(),
            )
        return gen, (height, width)

    # -- one denoiser evaluation ----------------------------------------------------------------------------

    def _predict(self, branches: list[Branch], latents, t, step: int, num_steps: int, packs: dict):
        """The velocity of each guidance branch, [(B, C, h, w)], through the transformer's ``forward`` (offload
        hooks apply): one packed call for all branches, or one call per branch without ``batch_guidance``."""
        timestep = t.reshape(1).to(latents.dtype)  # (1,): one timestep for every sample
        for b in branches:
            b.cache.begin_step(step, num_steps)
        if not self.batch_guidance or len(branches) == 1:
            return [
                self.transformer(
                    latents,
                    timestep,
                    b.text,
                    None,
                    b.mask,
                    b.refs,
                    attention_kwargs=self._attention_kwargs,
                    layout=b.layout,
                    step_cache=b.cache,
                )
                for b in branches
            ]
        key = tuple(b.name for b in branches)
        if key not in packs:
            packs[key] = self._pack(branches, latents)
        text, mask, refs, layout, cache = packs[key]
        n = latents.shape[0]
        out = self.transformer(
            [x for _ in branches for x in latents],
            timestep,
            text,
            None,
            mask,
            refs,
            attention_kwargs=self._attention_kwargs,
            layout=layout,
            step_cache=cache,
        )  # [(C, h, w)] * (branches * B)
        return [torch.stack(out[k * n : (k + 1) * n]) for k in range(len(branches))]

    def _pack(self, branches: list[Branch], latents):
        """Inputs, layout and caches of one packed call over ``branches`` (built once per generation). Every
        branch's sample j shares the latents of sample j, and the branches with references share them."""
        n, length = latents.shape[0], max(b.text.shape[1] for b in branches)
        text = latents.new_zeros(len(branches) * n, length, branches[0].text.shape[-1], dtype=branches[0].text.dtype)
        mask = torch.zeros(len(branches) * n, length, dtype=torch.bool, device=text.device)
        for k, b in enumerate(branches):
            text[k * n : (k + 1) * n, : b.text.shape[1]] = b.text
            mask[k * n : (k + 1) * n, : b.mask.shape[1]] = b.mask
        refs = [r for b in branches for r in b.refs]
        layout = self.transformer.build_layout(
            mask,
            [[tuple(r.shape[-2:]) for r in (s or [])] for s in refs],
            [tuple(latents.shape[-2:])] * len(refs),
            cap_lens=[c for b in branches for c in b.layout.cap_lens],
            img_groups=[j for _ in branches for j in range(n)],
            ref_groups=[j for _ in branches for j in range(n)],
        )
        cache = BranchCaches([b.cache for b in branches], [n] * len(branches), [b.layout for b in branches])
        return text, mask, refs, layout, cache

    def _branch(self, name, text, mask, refs, latents, cache_config: CacheConfig) -> Branch:
        model = self.transformer
        cap_lens = mask.sum(dim=1).tolist()  # once per generation, before the loop
        ref_sizes = [[tuple(r.shape[-2:]) for r in (s or [])] for s in refs]
        layout = model.build_layout(mask, ref_sizes, [tuple(latents.shape[-2:])] * latents.shape[0], cap_lens=cap_lens)
        return Branch(name, text, mask.bool(), refs, layout, cache_config.make())

    # -- the call: six stages -------------------------------------------------------------------------------

    def _resolve_settings(
        self,
        num_inference_steps,
        text_guidance_scale,
        image_guidance_scale,
        height,
        width,
        cfg_range,
        num_images_per_prompt,
        output_type,
        teacache,
        taylorseer,
    ) -> SamplingSettings:
        """Stage 1: check the arguments; an unset (None) setting comes from the checkpoint's ``sampling_defaults``,
        else from the original (28 steps, text guidance 4.0, image guidance 1.0). A set one is never replaced: 0
        steps or a 0 height is refused, not read as "unset"."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        cfg_range = _check_cfg_range(cfg_range)
        n = check_int("num_images_per_prompt", num_images_per_prompt, least=1)
        self.limits.check("images_per_prompt", n, f"num_images_per_prompt={n}")
        cache_config = self.cache_config
        if teacache is not None or taylorseer is not None:
            if teacache is not None:
                teacache = check_float("teacache", teacache, least=0.0)
            if taylorseer is not None and not isinstance(taylorseer, bool):
                raise TypeError(f"taylorseer must be True, False or None, got {taylorseer!r}")
            cache_config = CacheConfig(teacache=teacache, taylorseer=bool(taylorseer))
        d = self.sampling_defaults
        steps = check_int("num_inference_steps", _unset(num_inference_steps, d, "num_inference_steps", 28), least=1)
        self.limits.check("steps", steps, f"num_inference_steps={steps}")
        guidance = [
            check_float(name, _unset(value, d, name, fallback), least=0.0)
            for name, value, fallback in (
                ("text_guidance_scale", text_guidance_scale, 4.0),
                ("image_guidance_scale", image_guidance_scale, 1.0),
            )
        ]
        height, width = (
            None if v is None else check_int(name, v, least=1)
            for name, v in (("height", _unset(height, d, "height", None)), ("width", _unset(width, d, "width", None)))
        )
        if height is not None or width is not None:  # the default fills the other side
            default = self.default_sample_size * self.vae_scale_factor
            h, w = height or default, width or default
            self.limits.check("output_pixels", h * w, f"the requested size height={h} x width={w} = {h * w} pixels")
        return SamplingSettings(
            steps=steps,
            text_guidance=guidance[0],
            image_guidance=guidance[1],
            height=height,
            width=width,
            cfg_range=cfg_range,
            cache_config=cache_config,
        )

    def _check_size_arguments(self, max_pixels, max_side_length, max_sequence_length) -> int:
        """Stage 1: the size budgets' types and ranges; returns the prompt-token length (None: ``limits``)."""
        check_int("max_pixels", max_pixels, least=1)
        if max_side_length is not None:
            check_int("max_input_image_side_length", max_side_length, least=1)
        if max_sequence_length is None:
            return self.limits.prompt_tokens
        length = check_int("max_sequence_length", max_sequence_length, least=1)
        self.limits.check("prompt_tokens", length, f"max_sequence_length={length}")
        return length

    def _encode_prompts(
        self, prompts, negative_prompt, embeds, mask, negative_embeds, negative_mask, guided, n, max_length, device
    ) -> PromptStates:
        """Stage 2: the hidden states of ``prompts`` (unless ``embeds`` are given) and, with text guidance
        (``guided``), of the negative prompts ("" by default), each row repeated ``n`` times."""
        if embeds is None:
            embeds, mask = self.encode_text(prompts, max_length, device)
        batch = embeds.shape[0]
        if guided and negative_embeds is None:
            negs = negative_prompt if negative_prompt is not None else ""
            negs = [negs] * batch if isinstance(negs, str) else list(negs)
            if len(negs) != batch:
                raise ValueError(f"negative_prompt has {len(negs)} entries for {batch} prompts")
            negative_embeds, negative_mask = self.encode_text(negs, max_length, device)
        return PromptStates(
            batch, _repeat(embeds, n), _repeat(mask, n), _repeat(negative_embeds, n), _repeat(negative_mask, n)
        )

    def _text_room(self, max_sequence_length: int, images, max_pixels, max_side_length) -> int:
        """Stage 2: the prompt tokens to keep: ``max_sequence_length``, fewer where the transformer's position
        table would overflow (``PositionTable.text_room``): a long prompt would otherwise crash the position
        embedding after the MLLM ran (as the original does)."""
        table = self.transformer.position_table(self.vae_scale_factor)
        room = []
        for i, imgs in enumerate(images):
            sizes = [self.image_processor.target_size(im.height, im.width, max_pixels, max_side_length) for im in imgs]
            for j, (im, size) in enumerate(zip(imgs, sizes)):
                self._check_grid(size, f"input image {j} of prompt {i} ({im.width}x{im.height}, resized to "
                                 f"{size[1]}x{size[0]})")  # fmt: skip
            room.append(table.text_room(sizes))
        if min(room) < 1:
            raise ValueError(
                f"the input images of prompt {room.index(min(room))} take all of the transformer's "
                f"{table.axes_lens[0]} positions (axes_lens[0]), leaving none for the prompt; use smaller images "
                "(max_pixels, max_input_image_side_length)"
            )
        return min(max_sequence_length, *room)

    def _check_grid(self, size: tuple[int, int], what: str) -> None:
        """Refuse an image of ``size`` (h, w) pixels whose rows or columns of patches overflow the transformer's
        position table (axes_lens[1] and [2]): an aspect ratio the model cannot place, found before any work
        rather than in the position embedding."""
        table = self.transformer.position_table(self.vae_scale_factor)
        if not table.image_fits(size):
            rows, cols = table.grid(size)
            raise ValueError(
                f"{what} is {rows}x{cols} patches (rows x columns), beyond the transformer's position table of "
                f"{table.axes_lens[1]}x{table.axes_lens[2]} (axes_lens[1:]); choose a less extreme aspect ratio"
            )

    def _encode_references(self, images, n, max_pixels, max_side_length, generator, sample):
        """Stage 3: each prompt's input images (checked: ``_normalize_images``) -> VAE latents (never through the
        MLLM), per sample: a list of (C, h, w), or None, each prompt's repeated ``n`` times."""
        ref_gen = generator[0] if isinstance(generator, list) else generator
        per_prompt = [
            self.encode_images(imgs, max_pixels, max_side_length, ref_gen, sample) if imgs else None for imgs in images
        ]
        return [r for r in per_prompt for _ in range(n)]

    def _prepare_latents(self, latents, samples: int, size: tuple[int, int], generator, device, dtype):
        """Stage 3: the initial noise (samples, C, H / f, W / f) for the generation size ``size`` (f: the VAE's
        downsampling factor), or the given latents after a shape check."""
        shape = (
            samples,
            self.transformer.config.in_channels,
            size[0] // self.vae_scale_factor,
            size[1] // self.vae_scale_factor,
        )
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for this call")
        return latents.to(device=device, dtype=dtype)

    def _sampler(self, name: str | None, steps: int, timesteps, latents, device):
        """Stage 4a: the pipeline's scheduler, or a fresh one by ``name``, set to this call's timesteps."""
        sched = self.scheduler
        if name:
            cfg = self.scheduler.config
            sched = make_scheduler(name, cfg.get("dynamic_time_shift", True), cfg.get("time_shift_factor"))
        num_tokens = latents.shape[-2] * latents.shape[-1]  # latent pixels: the dynamic time shift's length
        sched.set_timesteps(steps, device=device, timesteps=timesteps, num_tokens=num_tokens)
        return sched

    def _make_branches(self, text: PromptStates, refs, latents, settings: SamplingSettings) -> list[Branch | None]:
        """Stage 4b: [conditional, reference-only, unconditional], the guidance branches this call needs (None
        for the others): text guidance adds the unconditional one, image guidance with input images the
        reference-only one (negative prompt + input images), as the original."""
        cache_config = settings.cache_config
        cond = self._branch("cond", text.embeds, text.mask, refs, latents, cache_config)
        if settings.text_guidance <= 1.0:
            return [cond, None, None]
        no_refs = [None] * latents.shape[0]
        uncond = self._branch("uncond", text.negative_embeds, text.negative_mask, no_refs, latents, cache_config)
        ref = None
        if settings.image_guidance > 1.0 and any(refs):  # without input images there is nothing to guide with
            ref = self._branch("ref", text.negative_embeds, text.negative_mask, refs, latents, cache_config)
        return [cond, ref, uncond]

    def _denoise(self, latents, sched, branches: list[Branch | None], settings: SamplingSettings, callback, step_func):
        """Stage 5: the sampling loop. No host syncs: which branches run depends only on the step index."""
        cond, ref, uncond = branches
        tgs, igs = settings.text_guidance, settings.image_guidance
        steps, vae_dtype = sched.timesteps, self.vae.dtype
        packs: dict = {}  # packed inputs per set of active branches, built at first use
        with self.progress_bar(total=len(steps)) as progress:
            for i, t in enumerate(steps):
                guided = settings.cfg_range[0] <= i / len(steps) <= settings.cfg_range[1]
                if guided and ref is not None:
                    pred, pred_ref, pred_uncond = self._predict([cond, ref, uncond], latents, t, i, len(steps), packs)
                    # The original's order of operations, kept for bitwise-close parity.
                    pred = pred_uncond + igs * (pred_ref - pred_uncond) + tgs * (pred - pred_ref)
                elif guided and uncond is not None:
                    pred, pred_uncond = self._predict([cond, uncond], latents, t, i, len(steps), packs)
                    pred = pred_uncond + tgs * (pred - pred_uncond)
                else:
                    (pred,) = self._predict([cond], latents, t, i, len(steps), packs)
                latents = sched.step(pred, t, latents, return_dict=False)[0].to(vae_dtype)
                if callback is not None:
                    out = callback(self, i, t, {"latents": latents}) or {}
                    latents = out.get("latents", latents)
                if step_func is not None:
                    step_func(i, len(steps))
                progress.update()
        return latents

    def _decode(self, latents, size: tuple[int, int], output_type: str):
        """Stage 6: latents -> images of the requested ``size`` (resized from the generation size) in
        ``output_type``; "latent" returns the latents as they are."""
        if output_type == "latent":
            return latents
        image = self.decode_latents(latents).float()  # images leave the pipeline in float32
        if tuple(size) != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=tuple(size), mode="bilinear")
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        input_images=None,
        height: int | None = None,
        width: int | None = None,
        align_res: bool = True,
        max_pixels: int = 1024 * 1024,
        max_input_image_side_length: int = 1024,
        num_inference_steps: int | None = None,
        text_guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        cfg_range: tuple[float, float] = (0.0, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = 1024,
        timesteps: list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        step_func: Callable[[int, int], None] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        scheduler: str | None = None,
        teacache: float | None = None,
        taylorseer: bool | None = None,
        sample_reference_latents: bool = False,
        attention_kwargs: dict | None = None,
    ):
        """Generate images. Keyword arguments follow the original pipeline; in addition ``scheduler``
        ("euler" / "dpmsolver++") picks the sampler for this call, ``teacache`` (a threshold) or
        ``taylorseer=True`` switch a step cache on for this call, ``sample_reference_latents`` samples the VAE
        posterior of the input images with ``generator`` instead of taking its mean, and
        ``callback_on_step_end(pipe, step, t, {"latents": ...})`` may return replacement latents."""
        # 1. Check the arguments; unset sampling settings from the checkpoint, else the original's
        settings = self._resolve_settings(
            num_inference_steps, text_guidance_scale, image_guidance_scale, height, width, cfg_range,
            num_images_per_prompt, output_type, teacache, taylorseer,
        )  # fmt: skip
        max_sequence_length = self._check_size_arguments(max_pixels, max_input_image_side_length, max_sequence_length)
        if not isinstance(align_res, bool):
            raise TypeError(f"align_res must be True or False, got {_short(align_res)}")
        self._attention_kwargs = attention_kwargs
        device, n = self._execution_device, num_images_per_prompt

        # 2. Sizes (generation, output), then the text: hidden states of the prompts and, with text guidance, of
        # the negative prompts (B * n rows), within the positions the input images leave free
        prompts = _prompt_list(prompt) if prompt_embeds is None else None
        if prompts is not None:
            self._check_domain(prompts)
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        images = self._normalize_images(input_images, batch)
        gen_size, out_size = self._output_size(
            settings.height, settings.width, images, align_res, max_pixels, max_input_image_side_length
        )
        max_length = self._text_room(max_sequence_length, images, max_pixels, max_input_image_side_length)
        text = self._encode_prompts(
            prompts, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, settings.text_guidance > 1.0, n, max_length, device,
        )  # fmt: skip

        # 3. Reference images -> VAE latents, the initial noise
        refs = self._encode_references(
            images, n, max_pixels, max_input_image_side_length, generator, sample_reference_latents
        )
        latents = self._prepare_latents(latents, len(refs), gen_size, generator, device, text.embeds.dtype)

        # 4. Sampler and guidance branches (layouts, masks and RoPE built once)
        sched = self._sampler(scheduler, settings.steps, timesteps, latents, device)
        branches = self._make_branches(text, refs, latents, settings)

        # 5. Denoising loop
        latents = self._denoise(latents, sched, branches, settings, callback_on_step_end, step_func)

        # 6. Decode, resize to the requested size, convert
        result = self._decode(latents, out_size, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        computed = {b.name: list(b.cache.computed_steps) for b in branches if b is not None}
        return OmniGen2PipelineOutput(images=result, computed_steps=computed)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this file and torch's ``no_grad`` wrapper: a warning of
    any stage points at the line that called the pipeline."""
    frame, level = sys._getframe(1), 1  # the function that warns
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.endswith("_contextlib.py")
    ):
        frame, level = frame.f_back, level + 1
    return level


def _prompt_list(prompt: str | list[str] | None) -> list[str]:
    if prompt is None:
        raise ValueError("give a prompt (or prompt_embeds)")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {_short(prompt)}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__} {_short(p)}")
    return list(prompts)


def _unset(value, defaults: dict, key: str, fallback):
    """The call's value; None: the checkpoint's ``sampling_defaults[key]``, else ``fallback`` (only None means
    unset, so 0 or 0.0 is checked, never replaced)."""
    if value is not None:
        return value
    default = defaults.get(key)
    return fallback if default is None else default


def _check_cfg_range(cfg_range) -> tuple[float, float]:
    if isinstance(cfg_range, (str, bytes)) or not isinstance(cfg_range, (list, tuple)) or len(cfg_range) != 2:
        raise TypeError(f"cfg_range must be a pair of numbers (start, end), got {_short(cfg_range)}")
    start, end = (check_float(f"cfg_range[{k}]", v) for k, v in enumerate(cfg_range))
    if not (0.0 <= start <= end <= 1.0):
        raise ValueError(f"cfg_range must satisfy 0 <= start <= end <= 1, got {(start, end)}")
    return start, end


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _repeat(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(B, ...) -> (B * n, ...), each row repeated n times in place (prompt 0 x n, prompt 1 x n, ...)."""
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


__all__ = ["OmniGen2Pipeline", "OmniGen2PipelineOutput", "SYSTEM_PROMPT"]
