"""``omnigen2 bench``: time one generation of the transformer's denoising loop with random weights.

The call is the pipeline's own (``OmniGen2Pipeline.__call__`` with precomputed text hidden states, so no MLLM
is needed, and a small random VAE whose cost is negligible next to the transformer), at a named transformer
size with random weights (nothing is downloaded). It reports the end-to-end time and the per-step times
(medians over repeats), the peak memory, the transformer FLOPs of the generation and the achieved FLOP/s.

FLOPs count the matrix products (2 per multiply-add) and the attention products (QK^T and PV) of what the
model computes: the context refiner once per generation (its output is cached), the refiners of the shared
target and reference images once per step, the joint blocks over every branch's tokens.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import PIL.Image
import torch

from .loading import parse_dtype
from .models.transformer_omnigen2 import PRESETS, OmniGen2Transformer2DModel, SequenceLayout


@dataclass
class BenchConfig:
    preset: str = "mid"  # transformer size: tiny | mid | full (random weights)
    model: str | None = None  # a real pipeline (directory, hub id, builtin:NAME) instead of a random preset
    prompt: str = "a red circle above a blue square"  # the prompt of a real pipeline's timed call
    height: int | None = 128  # None: the model's recommended size (--model only)
    width: int | None = 128
    num_images: int | None = None  # input (reference) images; None: 1 for a preset, 0 (text only) for a model
    branches: int = 3  # guidance branches: 1 (none), 2 (text), 3 (text + image; needs num_images >= 1)
    steps: int | None = 6  # None: the model's recommended steps (--model only)
    device: str = "cpu"
    dtype: str = "fp32"
    text_tokens: int = 48  # prompt length in tokens, chat template included
    negative_tokens: int = 40
    repeats: int = 3
    warmup: int = 1
    batch_guidance: bool = True
    attention: str = "auto"
    compile: bool = False
    quantize: str = "none"
    offload: str = "none"
    seed: int = 0


@dataclass
class BenchResult:
    config: BenchConfig
    end_to_end_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # median over repeats, per step
    peak_memory_mb: float = 0.0
    memory_kind: str = ""
    flops: float = 0.0
    params: int = 0
    machine: str = ""
    torch_version: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.end_to_end_s)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.median_s


def _linear_macs(module: torch.nn.Module) -> int:
    # nn.Linear and its quantized replacements (which keep in_features / out_features)
    return sum(
        m.in_features * m.out_features
        for m in module.modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children())
    )


def _blocks_flops(blocks, seq_lens: list[int], rows: int, heads: int, head_dim: int, out_lens=None) -> float:
    """Linear layers over the tokens of ``seq_lens`` (the modulation linear over ``rows`` temb rows) and
    attention. ``out_lens``: the last block computes queries, output projection and MLP for these rows only."""
    if not len(blocks):
        return 0.0
    blk = blocks[0]
    mod = _linear_macs(blk.norm1) if blk.modulation else 0
    kv = _linear_macs(blk.attn.to_k) + _linear_macs(blk.attn.to_v)
    rest = _linear_macs(blk) - mod - kv

    def one(q_lens):
        attn = sum(4 * nq * nk * heads * head_dim for nq, nk in zip(q_lens, seq_lens))  # QK^T and PV
        return 2.0 * (kv * sum(seq_lens) + rest * sum(q_lens) + mod * rows) + attn

    last = one(out_lens if out_lens is not None else seq_lens)
    return (len(blocks) - 1) * one(seq_lens) + last


def transformer_flops(model: OmniGen2Transformer2DModel, layout: SequenceLayout, context: bool) -> float:
    """FLOPs of one forward over ``layout`` (matrix products and attention); ``context``: whether the caption
    embedding and context refiner run (once per generation when cached)."""
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    total = _linear_macs(model.time_caption_embed.timestep_embedder) * 2.0
    if context:
        t_txt = sum(layout.cap_lens)
        total += 2.0 * _linear_macs(model.time_caption_embed.caption_embedder) * t_txt
        total += _blocks_flops(model.context_refiner, layout.cap_lens, 0, heads, head_dim)
    img_lens = layout.img.segs.lens
    total += 2.0 * _linear_macs(model.x_embedder) * sum(img_lens)
    total += _blocks_flops(model.noise_refiner, img_lens, 1, heads, head_dim)
    if layout.ref is not None:
        ref_lens = layout.ref.segs.lens
        total += 2.0 * _linear_macs(model.ref_image_patch_embedder) * sum(ref_lens)
        total += _blocks_flops(model.ref_image_refiner, ref_lens, 1, heads, head_dim)
    total += _blocks_flops(model.layers, layout.seq_lens, 1, heads, head_dim, layout.img_lens)
    total += 2.0 * _linear_macs(model.norm_out) * sum(layout.img_lens)
    return total


def _check_memory(cfg: BenchConfig) -> None:
    if cfg.preset != "full":
        return
    need = 4.0e9 * parse_dtype(cfg.dtype).itemsize * 1.3  # ~4B parameters + activations and workspace
    if cfg.device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(cfg.device)).total_memory
    else:
        import os

        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if have < need:
        raise MemoryError(
            f"the full-size transformer needs about {need / 1e9:.0f} GB in {cfg.dtype}; {cfg.device} has "
            f"{have / 1e9:.1f} GB available. Use --preset mid, --dtype bf16 or a larger device."
        )


def build_bench_pipeline(cfg: BenchConfig):
    """A pipeline with a random-weight transformer of ``cfg.preset``, a small random VAE (8x downsampling, as
    the released one) and no MLLM (text hidden states are given)."""
    from diffusers import AutoencoderKL

    from .acceleration.memory import enable_offload, quantize_transformer
    from .pipelines import OmniGen2Pipeline
    from .schedulers import make_scheduler

    _check_memory(cfg)
    dtype = parse_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    with torch.device("meta" if cfg.preset == "full" else "cpu"):
        transformer = OmniGen2Transformer2DModel.from_preset(cfg.preset)
    if cfg.preset == "full":  # random weights straight in the target dtype: no 16 GB fp32 detour
        transformer = transformer.to_empty(device=cfg.device if cfg.offload == "none" else "cpu").to(dtype)
        for p in transformer.parameters():
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        for p in transformer.parameters():  # the training init zeroes the adaLN and output layers: the
            if not p.any():  # prediction would be exactly zero; give them small random values
                torch.nn.init.normal_(p, std=0.02)
    channels = transformer.config.in_channels
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=channels,
        norm_num_groups=4,
        layers_per_block=1,
    )
    pipe = OmniGen2Pipeline(transformer.to(dtype), vae.to(dtype), make_scheduler("euler"), None, None)
    pipe.set_progress_bar_config(disable=True)
    pipe.batch_guidance = cfg.batch_guidance
    transformer.set_attention_backend(cfg.attention)
    if cfg.quantize != "none":
        quantize_transformer(transformer, cfg.quantize)
    if cfg.offload != "none":
        enable_offload(pipe, cfg.offload, cfg.device)
    else:
        pipe.to(cfg.device)
    if cfg.compile:
        for blk in transformer.layers:  # compile the repeated block, not the whole model
            blk.compile(dynamic=False)
    return pipe


def bench_inputs(cfg: BenchConfig, text_dim: int, channels: int, device, dtype) -> dict:
    """Random text hidden states, reference images and initial noise for one call."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    images = [
        PIL.Image.fromarray((torch.rand(cfg.height, cfg.width, 3, generator=g) * 255).byte().numpy())
        for _ in range(cfg.num_images)
    ]
    kwargs = dict(
        prompt_embeds=torch.randn(1, cfg.text_tokens, text_dim, generator=g).to(device, dtype),
        prompt_attention_mask=torch.ones(1, cfg.text_tokens, dtype=torch.long, device=device),
        input_images=images or None,
        height=cfg.height,
        width=cfg.width,
        num_inference_steps=cfg.steps,
        text_guidance_scale=5.0 if cfg.branches >= 2 else 1.0,
        image_guidance_scale=2.0 if cfg.branches >= 3 else 1.0,
        latents=torch.randn(1, channels, cfg.height // 8, cfg.width // 8, generator=g).to(device, dtype),
        output_type="latent",
        max_pixels=cfg.height * cfg.width,
        max_input_image_side_length=max(cfg.height, cfg.width),
    )
    if cfg.branches >= 2:
        kwargs["negative_prompt_embeds"] = torch.randn(1, cfg.negative_tokens, text_dim, generator=g).to(device, dtype)
        kwargs["negative_prompt_attention_mask"] = torch.ones(1, cfg.negative_tokens, dtype=torch.long, device=device)
    return kwargs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _model_call(cfg: BenchConfig):
    """A real pipeline and the kwargs of one full call (prompt -> MLLM -> denoising -> VAE decode -> PIL) with
    the checkpoint's recommended sampling settings; ``steps`` and the size override them when given."""
    from .pipelines import OmniGen2Pipeline

    pipe = OmniGen2Pipeline.from_pretrained(cfg.model, torch_dtype=parse_dtype(cfg.dtype), device=cfg.device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    size = (cfg.height or 64, cfg.width or 64)
    images = [
        PIL.Image.fromarray((torch.rand(*size, 3, generator=g) * 255).byte().numpy()) for _ in range(cfg.num_images)
    ]
    kwargs = dict(prompt=cfg.prompt, input_images=images or None, output_type="pil", generator=g)
    if cfg.steps:
        kwargs["num_inference_steps"] = cfg.steps
    if cfg.height and cfg.width:
        kwargs.update(height=cfg.height, width=cfg.width)
    return pipe, kwargs


def run_bench(cfg: BenchConfig) -> BenchResult:
    if cfg.num_images is None:  # a model's prompt is text-only unless images are asked for
        cfg = replace(cfg, num_images=0 if cfg.model is not None else 1)
    if cfg.model is not None:
        pipe, kwargs = _model_call(cfg)
    else:
        pipe, kwargs = _preset_call(cfg)
    model = pipe.transformer
    stamps: list[float] = []

    def step_func(i, n):
        _sync(cfg.device)
        stamps.append(time.perf_counter())

    result = BenchResult(config=cfg, machine=_machine(cfg.device), torch_version=torch.__version__)
    result.params = sum(p.numel() for p in model.parameters())
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    for r in range(cfg.warmup + cfg.repeats):
        stamps.clear()
        _sync(cfg.device)
        start = time.perf_counter()
        pipe(**kwargs, step_func=step_func)
        _sync(cfg.device)
        if r >= cfg.warmup:
            result.end_to_end_s.append(time.perf_counter() - start)
            per_step.append([b - a for a, b in zip([start, *stamps[:-1]], stamps)])
    result.step_s = [statistics.median(s) for s in zip(*per_step)]
    if cfg.device.startswith("cuda"):
        result.peak_memory_mb, result.memory_kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA allocated"
    else:
        result.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.memory_kind = "process peak RSS"
    # FLOPs are counted from a preset's layout; a real pipeline's call also runs the MLLM and the VAE.
    result.flops = _generation_flops(pipe, cfg, kwargs) if cfg.model is None else 0.0
    return result


def _preset_call(cfg: BenchConfig):
    if cfg.branches == 3 and cfg.num_images < 1:
        raise ValueError("3 guidance branches (text + image) need at least one input image")
    pipe = build_bench_pipeline(cfg)
    model = pipe.transformer
    dtype = parse_dtype(cfg.dtype)
    return pipe, bench_inputs(cfg, model.config.text_feat_dim, model.config.in_channels, cfg.device, dtype)


def _generation_flops(pipe, cfg: BenchConfig, kwargs) -> float:
    """FLOPs of the generation's transformer work, from the layout the packed call uses."""
    model = pipe.transformer
    n_img = cfg.num_images
    latent = (cfg.height // 8, cfg.width // 8)
    refs = (
        [pipe.encode_images(kwargs["input_images"], cfg.height * cfg.width, max(cfg.height, cfg.width))]
        if n_img
        else [None]
    )
    ref_sizes = [tuple(r.shape[-2:]) for r in (refs[0] or [])]
    branches = [(cfg.text_tokens, ref_sizes)]
    if cfg.branches == 3:
        branches.append((cfg.negative_tokens, ref_sizes))
    if cfg.branches >= 2:
        branches.append((cfg.negative_tokens, []))
    cap_lens = [c for c, _ in branches]
    mask = torch.ones(len(branches), max(cap_lens), dtype=torch.bool)
    groups = list(range(len(branches)))
    if cfg.batch_guidance:
        groups = [0] * len(branches)
    layout = model.build_layout(
        mask,
        [s for _, s in branches],
        [latent] * len(branches),
        cap_lens=cap_lens,
        img_groups=groups,
        ref_groups=groups,
    )
    per_step = transformer_flops(model, layout, context=False)
    return cfg.steps * per_step + transformer_flops(model, layout, context=True) - per_step


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def format_result(result: BenchResult) -> str:
    c = result.config
    steps = ", ".join(f"{s * 1e3:.0f}" for s in result.step_s)
    what = (
        f"model {c.model}, prompt {c.prompt!r}, {c.num_images} input image(s), its sampling settings"
        if c.model is not None
        else f"preset {c.preset}, {c.width}x{c.height}, {c.num_images} input image(s), {c.branches} guidance "
        f"branch(es), {c.steps} steps"
    )
    flops = (
        f"{result.flops / 1e9:.2f} GFLOP per generation, {result.flops_per_s / 1e9:.1f} GFLOP/s"
        if result.flops
        else "n/a (FLOPs are counted for presets)"
    )
    return "\n".join(
        [
            f"{what} ({result.params / 1e6:.1f}M transformer params), {c.dtype} on {c.device}",
            f"  batch_guidance={c.batch_guidance} attention={c.attention} compile={c.compile} "
            f"quantize={c.quantize} offload={c.offload}",
            f"  end to end: median {result.median_s:.3f} s over {len(result.end_to_end_s)} runs "
            f"({', '.join(f'{t:.3f}' for t in result.end_to_end_s)})",
            f"  per step (ms, median): {steps}",
            f"  peak memory: {result.peak_memory_mb:.0f} MiB ({result.memory_kind})",
            f"  transformer: {flops}",
        ]
    )


MD_HEADING = "## Inference"
MD_TABLE = (
    "| date | machine | command | end to end (median) | per step (median, ms) | peak memory | transformer FLOP/s |\n"
    "| --- | --- | --- | --- | --- | --- | --- |\n"
)


def record_markdown(result: BenchResult, path, command: str) -> None:
    """Add one row to the table under "## Inference" of ``path`` (created with its heading if missing)."""
    from pathlib import Path

    path = Path(path)
    steps = " / ".join(f"{s * 1e3:.0f}" for s in result.step_s)
    row = (
        f"| {time.strftime('%Y-%m-%d')} | {result.machine}, torch {result.torch_version} | `{command}` | "
        f"{result.median_s:.3f} s | {steps} | {result.peak_memory_mb:.0f} MiB ({result.memory_kind}) | "
        + (f"{result.flops_per_s / 1e9:.1f} GFLOP/s of {result.flops / 1e9:.1f} GFLOP" if result.flops else "n/a")
        + " |\n"
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MD_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{MD_HEADING}\n\n" + MD_TABLE
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == MD_HEADING)
    if not any(line.startswith("| date |") for line in lines[start:]):
        lines.insert(start + 1, "\n" + MD_TABLE)
        lines = "".join(lines).splitlines(keepends=True)
    head = next(i for i in range(start, len(lines)) if lines[i].startswith("| date |"))
    end = head
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines.insert(end, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


def as_dict(result: BenchResult) -> dict:
    out = asdict(result)
    out.update(median_s=result.median_s, flops_per_s=result.flops_per_s)
    return out


__all__ = ["PRESETS", "BenchConfig", "BenchResult", "format_result", "run_bench", "transformer_flops"]
