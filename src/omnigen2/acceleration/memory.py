"""Memory modes and weight quantization, applied to a pipeline from outside the model.

Offload (diffusers / accelerate hooks; the pipeline calls every component through its ``forward``, so the
hooks see every call):

- ``"model"``       :meth:`DiffusionPipeline.enable_model_cpu_offload`: each component moves to the device when
                    its forward runs and back to the CPU when the next one starts (``mllm -> transformer -> vae``).
- ``"sequential"``  :meth:`DiffusionPipeline.enable_sequential_cpu_offload`: parameters stream in per module;
                    the least memory, the slowest.
- ``"group"``       diffusers group offloading, block by block (with a CUDA stream overlapping the transfers on
                    CUDA); each component's weights live on the CPU and visit the device group by group.

Quantization (weight-only, of the transformer blocks' linear layers; embeddings, the output head and norms
stay in full precision):

- ``"int8"``  per-output-channel symmetric int8 weights. With torchao installed its ``Int8WeightOnlyConfig``;
              otherwise :class:`Int8WeightOnlyLinear` (plain PyTorch: ``torch._weight_int8pack_mm`` for bf16/fp16 on
              CPU, else dequantize-and-matmul). CPU and CUDA. Saves weight memory (4x vs fp32); on CPU in
              float32 it is not faster than full precision.
- ``"fp8"``   torchao float8 weights with dynamic float8 activations; CUDA with compute capability >= 8.9
              (Hopper/Ada) only.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

OFFLOAD_MODES = ("none", "model", "sequential", "group")
QUANT_MODES = ("none", "int8", "fp8")
_BLOCK_LISTS = ("noise_refiner", "ref_image_refiner", "context_refiner", "layers")


def enable_offload(pipe, mode: str, device: str | torch.device = "cuda") -> None:
    """Switch ``pipe`` to an offload mode (see the module docstring); ``"none"`` does nothing."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        if torch.device(device).type == "cpu":
            # accelerate's per-module streaming targets an accelerator; on the CPU it fails inside accelerate
            raise ValueError("sequential offload streams weights to an accelerator; use device cuda (or mode 'group')")
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group":
        from diffusers.hooks import apply_group_offloading

        use_stream = torch.device(device).type == "cuda"
        for name in ("transformer", "mllm", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, nn.Module):
                apply_group_offloading(
                    module,
                    onload_device=torch.device(device),
                    offload_device=torch.device("cpu"),
                    offload_type="block_level",
                    num_blocks_per_group=1,
                    use_stream=use_stream,
                )


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


class Int8WeightOnlyLinear(nn.Module):
    """y = x W^T with W stored as int8 and one float scale per output channel (symmetric, absmax / 127)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (N, in)
        # the packed int8 kernel is fast for bf16/fp16 activations on CPU, ~30x slower than a dequantized matmul
        # for float32 ones (measured, torch 2.13): dequantize then
        if x.device.type == "cpu" and x.dtype != torch.float32 and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale.to(x.dtype))  # (N, out)
        else:
            y = F.linear(flat, self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _block_linear_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.split(".")[0] in _BLOCK_LISTS


def quantize_transformer(transformer: nn.Module, mode: str, backend: str = "auto") -> nn.Module:
    """Quantize the weights of the transformer blocks' linear layers in place.

    ``backend``: "torchao", "torch" (plain PyTorch int8) or "auto" (torchao when installed)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode == "none":
        return transformer
    use_ao = backend == "torchao" or (backend == "auto" and torchao_available())
    if mode == "fp8":
        dev = next(transformer.parameters()).device
        if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
            raise RuntimeError("fp8 quantization needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)")
        if not torchao_available():
            raise ImportError("fp8 quantization needs torchao: pip install torchao")
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), _block_linear_filter)
        return transformer
    if use_ao:
        if not torchao_available():
            raise ImportError("backend 'torchao' needs torchao: pip install torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(transformer, Int8WeightOnlyConfig(), _block_linear_filter)
        return transformer
    for fqn, module in list(transformer.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{fqn}.{name}" if fqn else name
            if _block_linear_filter(child, full):
                setattr(module, name, Int8WeightOnlyLinear(child))
    return transformer
