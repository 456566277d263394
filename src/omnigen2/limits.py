"""Resource bounds of one generation or chat call, each with a flag (and a field) that raises it.

A request beyond a bound is refused with :class:`~omnigen2.errors.LimitError` before anything is allocated, in a
message that names the bound and how to raise it. The defaults sit well above what the released 4B model is used
for (the original generates at most 2048 x 2048, with 50 steps and a 1024-token prompt by default), so normal use
never meets them; a typo (``--height 100000``, ``--steps 10000``) does. Nothing here imports torch: the command
line, ``omnigen2 batch`` and the server read these before loading a model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .errors import LimitError

# Rows of the transformer's image_index_embedding in the released checkpoint (the model's MAX_REF_IMAGES; a test
# checks that they agree): no flag raises it.
MAX_INPUT_IMAGES = 5


@dataclass(frozen=True)
class Limits:
    """Bounds on one call of ``OmniGen2Pipeline`` (``pipe.limits``) or ``OmniGen2ChatPipeline``
    (``chat.pipe.limits``). Raise one with ``pipe.limits = Limits(steps=500)`` or its command-line flag."""

    steps: int = 200  # num_inference_steps (the original: 50 by default)
    images_per_prompt: int = 16  # num_images_per_prompt, and a chat's reflect_candidates
    output_pixels: int = 4096 * 4096  # height x width of a requested or generated image (the original: 2048^2)
    prompt_tokens: int = 4096  # max_sequence_length, and the text tokens of a chat conversation (the original: 1024)
    prompt_chars: int = 65536  # characters of a prompt read before tokenizing (longer: truncated, chat: refused)
    input_images: int = MAX_INPUT_IMAGES  # input images per prompt or chat turn (the model takes at most 5)
    new_tokens: int = 4096  # a chat answer's max_new_tokens (the original: 256)
    reflect: int = 16  # a chat's reflection rounds

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Limits.{f.name} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"Limits.{f.name} must be >= 1, got {value}")
        if self.input_images > MAX_INPUT_IMAGES:
            raise ValueError(f"Limits.input_images: OmniGen2 takes at most {MAX_INPUT_IMAGES}, got {self.input_images}")

    def check(self, name: str, value: int, what: str) -> None:
        """Raise LimitError when ``value`` (described by ``what``, e.g. "num_inference_steps=500") is above the
        bound ``name``."""
        bound = getattr(self, name)
        if value > bound:
            raise LimitError(f"{what} is above the limit of {bound} {DESCRIPTIONS[name]}; {how_to_raise(name)}")

    def covering(self, **values: int) -> Limits:
        """These limits, each raised to at least ``values[name]`` (a server's request limits may exceed them)."""
        return dataclasses.replace(self, **{k: max(getattr(self, k), v) for k, v in values.items()})


DESCRIPTIONS = {
    "steps": "denoising steps",
    "images_per_prompt": "images per prompt",
    "output_pixels": "output pixels (height x width)",
    "prompt_tokens": "prompt tokens",
    "prompt_chars": "prompt characters",
    "input_images": "input images",
    "new_tokens": "new tokens of a chat answer",
    "reflect": "reflection rounds",
}
# The command-line flag of each bound (generate, chat; omnigen2 serve has its own request limits).
FLAGS = {
    "steps": "--limit-steps",
    "images_per_prompt": "--limit-images",
    "output_pixels": "--limit-output-pixels",
    "prompt_tokens": "--limit-prompt-tokens",
    "prompt_chars": "--limit-prompt-chars",
    "new_tokens": "--limit-new-tokens",
    "reflect": "--limit-reflect",
}


def check_int(name: str, value, least: int | None = None, most: int | None = None) -> int:
    """``value`` as an int: TypeError for anything but an integer (a bool, a float such as 2.0, a str), ValueError
    outside [least, most]; both name the argument and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be <= {most}, got {value}")
    return value


def check_float(name: str, value, least: float | None = None, most: float | None = None) -> float:
    """``value`` as a finite float: TypeError for a non-number (a bool, a str), ValueError for NaN, an infinity or
    a value outside [least, most]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be >= {least:g}, got {value:g}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be <= {most:g}, got {value:g}")
    return value


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def how_to_raise(name: str) -> str:
    if name == "input_images":
        return f"the model takes at most {MAX_INPUT_IMAGES}"
    return f"raise it with {FLAGS[name]} N (Python: pipe.limits = Limits({name}=N))"


__all__ = ["DESCRIPTIONS", "FLAGS", "Limits", "MAX_INPUT_IMAGES", "check_float", "check_int", "how_to_raise"]
