"""The model side of the server: one loaded pipeline, called on the scheduler's worker thread.

Each method takes a validated request and the :class:`~omnigen2.serving.queue.Job` it runs as, and calls the
library exactly as a user would (``OmniGen2Pipeline.__call__`` / ``OmniGen2ChatPipeline.__call__``): a request with
``seed`` S gets ``torch.Generator(device).manual_seed(S)`` and the library's defaults for every field it leaves out,
so its pixels are the library's. The job's ``check`` is called from ``callback_on_step_end`` (every denoising step)
and from the chat's ``logits_processor`` (every decoded token): a cancelled request stops there.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from ..pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline
from ..pipelines.pipeline_chat import DEFAULT_MAX_NEW_TOKENS, IMG_TOKEN, STOP_TOKENS, ChatOutput, Turn
from .queue import Job
from .schemas import ChatRequest, ImageRequest, Sampling, parse_size


@dataclass
class ImageResult:
    images: list[PIL.Image.Image]
    seed: int
    params: dict[str, Any]  # the settings written into each PNG's ``parameters`` chunk


@dataclass
class ChatResult:
    output: ChatOutput
    seed: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    params: dict[str, Any] = field(default_factory=dict)


class Engine:
    def __init__(self, pipe: OmniGen2Pipeline, model_name: str):
        self.pipe = pipe
        self.model_name = model_name
        pipe.set_progress_bar_config(disable=True)
        # Wraps the same components (the answering adapter, if the checkpoint has one, is injected switched off,
        # so generation is unchanged: tests/serving checks the pixels against a plain pipeline).
        self.chat = OmniGen2ChatPipeline(pipe)
        self.device = pipe._execution_device

    # -- shared ---------------------------------------------------------------------------------------------

    def _generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        seed = secrets.randbits(63) if seed is None else seed  # returned, so any result can be reproduced
        return torch.Generator(device=self.device).manual_seed(seed), seed

    @staticmethod
    def _step_check(job: Job) -> Callable:
        def callback_on_step_end(pipe, step, timestep, tensors):
            job.check()  # raises Cancelled: the request was withdrawn or ran out of time
            return None  # keep the latents

        return callback_on_step_end

    def _params(self, req: Sampling, seed: int, height, width, **extra) -> dict[str, Any]:
        """The PNG ``parameters`` chunk: the keys ``omnigen2 generate`` writes."""
        return {
            "negative_prompt": req.negative_prompt,
            "model": self.model_name,
            "seed": seed,
            "steps": req.num_inference_steps,
            "height": height,
            "width": width,
            "text_guidance": req.guidance_scale,
            "image_guidance": req.image_guidance,
            "cfg_range": list(req.cfg_range or (0.0, 1.0)),
            "scheduler": req.scheduler or type(self.pipe.scheduler).__name__,
            "defaults_from_checkpoint": self.pipe.sampling_defaults,
            **extra,
        }

    # -- images ---------------------------------------------------------------------------------------------

    def generate(self, job: Job, req: ImageRequest, images: list[PIL.Image.Image]) -> ImageResult:
        """Text-to-image (no ``images``), editing (one) or in-context generation (several)."""
        height, width = parse_size(req.size)
        generator, seed = self._generator(req.seed)
        out = self.pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            input_images=images or None,
            height=height,
            width=width,
            num_inference_steps=req.num_inference_steps,
            text_guidance_scale=req.guidance_scale,
            image_guidance_scale=req.image_guidance,
            cfg_range=tuple(req.cfg_range or (0.0, 1.0)),
            num_images_per_prompt=req.n,
            generator=generator,
            scheduler=req.scheduler,
            callback_on_step_end=self._step_check(job),
        )
        params = self._params(req, seed, height, width, prompt=req.prompt, input_images=len(images))
        return ImageResult(list(out.images), seed, params)

    # -- chat -----------------------------------------------------------------------------------------------

    def live_text(self, req: ChatRequest) -> bool:
        """Whether the answer's text can be streamed token by token as it is decoded. A checkpoint with an
        answering adapter decodes a text answer twice (docs/CHAT.md), and only the second pass is the answer,
        so its text is sent once it is final."""
        return not self.pipe.reflection_adapter

    def chat_turn(
        self,
        job: Job,
        req: ChatRequest,
        history: list[Turn],
        prompt: str,
        images: list[PIL.Image.Image],
        on_text: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """One turn after ``history``. ``on_text(text_so_far)`` is called as tokens are decoded (streaming)."""
        height, width = parse_size(req.size)
        generator, seed = self._generator(req.seed)
        max_new_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_NEW_TOKENS
        tokenizer = self.chat.tokenizer

        def logits_processor(step: int, answer_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            job.check()
            if on_text is not None:
                on_text(_answer_text(tokenizer, answer_ids))
            return logits

        image_kwargs: dict[str, Any] = {"callback_on_step_end": self._step_check(job)}
        if req.cfg_range is not None:
            image_kwargs["cfg_range"] = tuple(req.cfg_range)
        if req.scheduler is not None:
            image_kwargs["scheduler"] = req.scheduler
        self.chat.history = list(history)
        try:
            out = self.chat(
                prompt,
                input_images=images or None,
                reflect=req.reflect,
                reflect_candidates=req.reflect_candidates,
                generator=generator,
                height=height,
                width=width,
                num_inference_steps=req.num_inference_steps,
                text_guidance_scale=req.guidance_scale,
                image_guidance_scale=req.image_guidance,
                max_new_tokens=max_new_tokens,
                negative_prompt=req.negative_prompt,
                assistant_prefix=IMG_TOKEN if req.force_image else "",
                temperature=req.temperature or 0.0,
                top_p=req.top_p if req.top_p is not None else 1.0,
                logits_processor=logits_processor,
                **image_kwargs,
            )
        finally:
            self.chat.reset()  # each request carries its own history
        # Usage by re-tokenizing the answer: its tokens, <|img|> included; the pass fed all but a final <|img|>.
        completion = len(tokenizer(out.text, add_special_tokens=False).input_ids)
        fed = completion - int(out.text.endswith(IMG_TOKEN))
        drew = bool(out.images)
        finish = "length" if not drew and completion >= max_new_tokens else "stop"
        prompt_tokens = max(int(out.input_ids.shape[1]) - fed, 0) if out.input_ids is not None else 0
        params = self._params(req, seed, height, width, prompt=prompt, input_images=len(images), answer=out.text)
        return ChatResult(out, seed, prompt_tokens, completion, finish, params)


def _answer_text(tokenizer, ids: list[int]) -> str:
    """The answer so far as the chat pipeline decodes it: special tokens kept, the end-of-turn tokens dropped."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for t in STOP_TOKENS[:2]:
        text = text.replace(t, "")
    return text
