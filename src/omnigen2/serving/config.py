"""What a server is allowed to do: its limits, auth and scheduling settings, in one typed config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..limits import MAX_INPUT_IMAGES as MAX_REF_IMAGES  # the model's bound; omnigen2.limits imports no torch
from ..limits import Limits as CoreLimits

MIB = 1024 * 1024
CORE = CoreLimits()  # a request limit's default stays within the pipeline's own bound (omnigen2.limits)


@dataclass
class Limits:
    """Bounds on one request. Each has a ``--max-...`` flag; the defaults keep one request of the released
    model at the sizes it was trained for (about 1024x1024) and refuse the rest before any work is queued."""

    n: int = min(4, CORE.images_per_prompt)  # images per request (OpenAI's ``n``)
    pixels: int = min(1024 * 1024, CORE.output_pixels)  # width x height of a requested image
    side: int = 2048  # longest requested side
    steps: int = min(100, CORE.steps)  # num_inference_steps
    input_images: int = MAX_REF_IMAGES  # per edit request and per chat message; the model takes at most 5
    input_pixels: int = 4096 * 4096  # an uploaded image's pixels, checked from its header before decoding
    upload_bytes: int = 32 * MIB  # a request body (multipart files, or JSON with data URLs)
    prompt_chars: int = min(8000, CORE.prompt_chars)  # a prompt, a negative prompt, or one chat message's text
    messages: int = 32  # chat messages per request
    new_tokens: int = min(1024, CORE.new_tokens)  # a chat answer's max_tokens
    reflect: int = min(4, CORE.reflect)  # chat reflection rounds

    def core(self, base: CoreLimits) -> CoreLimits:
        """The pipeline's bounds raised to cover these request limits: a request the server admits is never
        refused by the pipeline's own (lower) bound."""
        return base.covering(
            steps=self.steps,
            images_per_prompt=self.n,
            output_pixels=self.pixels,
            prompt_chars=self.prompt_chars,
            new_tokens=self.new_tokens,
            reflect=self.reflect,
        )

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"limit {name} must be >= 1, got {value}")
        if self.input_images > MAX_REF_IMAGES:
            raise ValueError(
                f"OmniGen2 takes at most {MAX_REF_IMAGES} input images, got a limit of {self.input_images}"
            )


@dataclass
class ServeConfig:
    """How the server runs one loaded model."""

    model_name: str = "builtin:shapes"  # the id /v1/models lists and requests may name
    api_key: str | None = None  # None: no auth
    max_queue: int = 16  # requests waiting behind the running one; the next gets 429
    request_timeout: float | None = None  # seconds from arrival to answer (None: unbounded)
    allow_remote_images: bool = False  # fetch http(s) image URLs in chat messages
    remote_image_timeout: float = 10.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.api_key is not None and not self.api_key:
            self.api_key = None  # an empty key is no key
