"""The model side of ``omnigen2 app``: one loaded pipeline, shared by every browser tab.

A Create request becomes the same ``argparse`` namespace ``omnigen2 generate`` parses, so the pipeline call
(``generate_call_kwargs``) and the PNG's ``parameters`` text chunk (``generate_png_params``) are the command's own:
an image made in the page equals ``omnigen2 generate``'s for the same seed and settings, and carries the same
metadata. A chat turn calls ``OmniGen2ChatPipeline`` with the conversation so far, as ``omnigen2 chat`` does.
Nothing here imports gradio; the page (``ui.py``) turns ``ValueError`` into a message.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from ..cli import _save_png, build_parser, generate_call_kwargs, generate_png_params
from ..images import load_image
from ..pipelines import OmniGen2ChatPipeline, OmniGen2Pipeline
from ..pipelines.pipeline_chat import DEFAULT_MAX_NEW_TOKENS, IMG_TOKEN, Turn

MAX_INPUT_IMAGES = 5  # the transformer's reference-image slots, as `generate -i` allows
SIZE_RANGE = (64, 2048)  # width and height, multiples of 16 (the VAE's 8 times the patch size 2)
MAX_STEPS = 200
MAX_IMAGES_PER_PROMPT = 8
MAX_REFLECT = 8
MAX_SEED = 2**31 - 1  # a browser's numbers hold this exactly
SCHEDULERS = ("euler", "dpmsolver++")
STEP_CACHES = ("none", "teacache", "taylorseer")
# Fallbacks where a checkpoint stores no recommended setting: the library's own (OmniGen2Pipeline).
FALLBACKS = {"num_inference_steps": 28, "text_guidance_scale": 4.0, "image_guidance_scale": 1.0, "height": 1024}


class Cancelled(Exception):
    """The user pressed Cancel; raised from the step callback, so the pipeline stops at the next step."""


@dataclass
class CreateSettings:
    """Everything the Create view sends; names follow ``omnigen2 generate``'s options."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    text_guidance: float = 4.0
    image_guidance: float = 1.0
    cfg_start: float = 0.0
    cfg_end: float = 1.0
    scheduler: str = "euler"
    steps: int = 28
    num_images: int = 1
    seed: int = 0
    max_pixels: int = 1024 * 1024
    max_input_side: int = 1024
    step_cache: str = "none"
    teacache_threshold: float = 0.05
    keep_input_size: bool = True  # with one input image, draw at its size (generate's default; --no-align-res: False)

    def check(self) -> None:
        """Raise ValueError, naming the setting, for anything the page's widgets would not let through."""
        if not self.prompt or not self.prompt.strip():
            raise ValueError("the prompt is empty: say what to draw or how to change the input images")
        _check_size(self.width, self.height)
        _in_range("steps", self.steps, 1, MAX_STEPS)
        _in_range("images per prompt", self.num_images, 1, MAX_IMAGES_PER_PROMPT)
        _in_range("seed", self.seed, 0, MAX_SEED)
        _in_range("text guidance", self.text_guidance, 0.0, 20.0)
        _in_range("image guidance", self.image_guidance, 0.0, 20.0)
        if not 0.0 <= self.cfg_start <= self.cfg_end <= 1.0:
            raise ValueError(f"the CFG range must satisfy 0 <= start <= end <= 1, got {self.cfg_start}, {self.cfg_end}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.step_cache not in STEP_CACHES:
            raise ValueError(f"step cache must be one of {', '.join(STEP_CACHES)}, got {self.step_cache!r}")
        _in_range("TeaCache threshold", self.teacache_threshold, 0.0, 1.0)
        _in_range("max input pixels", self.max_pixels, 64 * 64, 4096 * 4096)
        _in_range("max input side", self.max_input_side, 64, 4096)

    def as_args(self, image_names: list[str], dtype: str) -> argparse.Namespace:
        """The namespace ``omnigen2 generate`` parses for these settings: its parser's defaults (so an option
        the command gains later keeps its default here), then the page's values."""
        args = build_parser().parse_args(["generate", "-"])  # "-": a prompt the parser cannot mistake
        args.__dict__.update(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or None,
            images=image_names,
            height=int(self.height),
            width=int(self.width),
            steps=int(self.steps),
            text_guidance=float(self.text_guidance),
            image_guidance=float(self.image_guidance),
            cfg_range=(float(self.cfg_start), float(self.cfg_end)),
            num_images=int(self.num_images),
            scheduler=self.scheduler,
            teacache=float(self.teacache_threshold) if self.step_cache == "teacache" else None,
            taylorseer=self.step_cache == "taylorseer",
            max_pixels=int(self.max_pixels),
            max_input_side=int(self.max_input_side),
            align_res=bool(self.keep_input_size),
            seed=int(self.seed),
            dtype=dtype,
        )
        return args


@dataclass
class ChatSettings:
    """The Chat view's settings: the drawing's sampling and the reflection rounds (``omnigen2 chat``'s options)."""

    reflect: int = 0
    seed: int = 0
    width: int = 1024
    height: int = 1024
    steps: int = 28
    text_guidance: float = 4.0
    image_guidance: float = 1.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    force_image: bool = False

    def check(self) -> None:
        _in_range("reflection rounds", self.reflect, 0, MAX_REFLECT)
        _in_range("seed", self.seed, 0, MAX_SEED)
        _check_size(self.width, self.height)
        _in_range("steps", self.steps, 1, MAX_STEPS)
        _in_range("text guidance", self.text_guidance, 0.0, 20.0)
        _in_range("image guidance", self.image_guidance, 0.0, 20.0)
        _in_range("max new tokens", self.max_new_tokens, 1, 4096)


@dataclass
class RoundShown:
    """One reflection round as the page shows it: the MLLM's verdict and answer, the fix, the repaired image."""

    verdict: str
    answer: str
    fix: str | None
    image: Path | None


@dataclass
class ChatReply:
    text: str  # the answer without the <|img|> token
    drew: bool
    drawing: Path | None  # the first drawing (before any repair)
    final: Path | None  # the image kept after reflection
    rounds: list[RoundShown] = field(default_factory=list)
    kept: int = 0  # which version the final image is: 0 the drawing, k the k-th repair
    history: list[Turn] = field(default_factory=list)  # the conversation including this turn


class Session:
    """The loaded pipeline and the chat pipeline over it; one pipeline call at a time (``lock``)."""

    def __init__(self, pipe: OmniGen2Pipeline, model_name: str, dtype: str = "fp32", out_dir: str | None = None):
        self.pipe = pipe
        self.model_name = model_name
        self.dtype = dtype
        pipe.set_progress_bar_config(disable=True)
        self._chat: OmniGen2ChatPipeline | None = None
        self.device = pipe._execution_device
        self.lock = threading.Lock()
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="omnigen2-app-"))
        self._cancel: dict[str, threading.Event] = {}

    @property
    def chat(self) -> OmniGen2ChatPipeline:
        """The chat pipeline over the same components, made on the first chat turn (it injects the checkpoint's
        answering adapter, switched off for generation)."""
        if self._chat is None:
            self._chat = OmniGen2ChatPipeline(self.pipe)
        return self._chat

    # -- settings -------------------------------------------------------------------------------------------

    def defaults(self) -> dict:
        """The checkpoint's recommended sampling settings (``pipe.sampling_defaults``), else the library's."""
        d = {**FALLBACKS, **self.pipe.sampling_defaults}
        height = int(d["height"])
        return {
            "height": height,
            "width": int(d.get("width", height)),
            "steps": int(d["num_inference_steps"]),
            "text_guidance": float(d["text_guidance_scale"]),
            "image_guidance": float(d["image_guidance_scale"]),
            "scheduler": "dpmsolver++" if "DPM" in type(self.pipe.scheduler).__name__ else "euler",
        }

    @staticmethod
    def pick_seed(seed, randomize: bool) -> int:
        return random.randint(0, MAX_SEED) if randomize else int(seed)

    # -- cancel ---------------------------------------------------------------------------------------------

    def cancel(self, key: str) -> None:
        self._cancel.setdefault(key, threading.Event()).set()

    def _step_callback(self, key: str, on_step: Callable[[int], None] | None):
        flag = self._cancel.setdefault(key, threading.Event())
        flag.clear()

        def callback_on_step_end(pipe, step, timestep, tensors):
            if flag.is_set():
                raise Cancelled("cancelled")
            if on_step is not None:
                on_step(step + 1)
            return None  # keep the latents

        return callback_on_step_end

    # -- images ---------------------------------------------------------------------------------------------

    @staticmethod
    def load_inputs(paths: list[str]) -> list[PIL.Image.Image]:
        """Uploaded files -> RGB images, checked as ``generate -i`` checks its files (``images.load_image``)."""
        if len(paths) > MAX_INPUT_IMAGES:
            raise ValueError(f"{len(paths)} input images given; OmniGen2 takes at most {MAX_INPUT_IMAGES}")
        images = []
        for k, p in enumerate(paths, 1):
            try:
                images.append(load_image(p))
            except ValueError as e:  # ImageError: the message names the temporary path; name the slot instead
                raise ValueError(str(e).replace(repr(str(p)), f"{k} ({Path(p).name})")) from None
        return images

    def generate(
        self, s: CreateSettings, image_paths: list[str], key: str = "", on_step: Callable[[int], None] | None = None
    ) -> list[Path]:
        """Text-to-image, editing or in-context generation; returns the PNGs written (settings in their text
        chunks, as ``omnigen2 generate`` writes them)."""
        s.check()
        images = self.load_inputs(image_paths)
        args = s.as_args([Path(p).name for p in image_paths], self.dtype)
        generator = torch.Generator(device=self.device).manual_seed(args.seed)
        kwargs = generate_call_kwargs(args, images, generator)
        kwargs["callback_on_step_end"] = self._step_callback(key, on_step)
        with self.lock:
            out = self.pipe(**kwargs)
        params = generate_png_params(args, self.model_name, self.pipe, self.device)
        stem = f"omnigen2_{args.seed}_{uuid.uuid4().hex[:8]}"
        if len(out.images) == 1:
            return [self._write(out.images[0], f"{stem}.png", params)]
        return [self._write(im, f"{stem}_{k}.png", {**params, "index": k}) for k, im in enumerate(out.images)]

    def _write(self, image: PIL.Image.Image, name: str, params: dict) -> Path:
        path = self.out_dir / name
        _save_png(image, path, params)
        return path

    # -- chat -----------------------------------------------------------------------------------------------

    def chat_turn(
        self,
        history: list[Turn],
        message: str,
        image_paths: list[str],
        s: ChatSettings,
        key: str = "",
        on_step: Callable[[int], None] | None = None,
    ) -> ChatReply:
        """One turn after ``history`` (which is not changed): a text answer, or a drawing with its reflection."""
        if not message or not message.strip():
            raise ValueError("the message is empty")
        s.check()
        images = self.load_inputs(image_paths)
        generator = torch.Generator(device=self.device).manual_seed(int(s.seed))
        with self.lock:
            self.chat.history = list(history)
            try:
                out = self.chat(
                    message,
                    input_images=images or None,
                    reflect=int(s.reflect),
                    generator=generator,
                    height=int(s.height),
                    width=int(s.width),
                    num_inference_steps=int(s.steps),
                    text_guidance_scale=float(s.text_guidance),
                    image_guidance_scale=float(s.image_guidance),
                    max_new_tokens=int(s.max_new_tokens),
                    assistant_prefix=IMG_TOKEN if s.force_image else "",
                    callback_on_step_end=self._step_callback(key, on_step),
                )
                new_history = list(self.chat.history)
            finally:
                self.chat.reset()
        reply = ChatReply(out.text.replace(IMG_TOKEN, "").strip(), bool(out.images), None, None, history=new_history)
        if not out.images:
            return reply
        params = {  # the keys `omnigen2 chat` writes
            "prompt": message,
            "input_images": [Path(p).name for p in image_paths],
            "model": self.model_name,
            "seed": int(s.seed),
            "steps": int(s.steps),
            "reflect": int(s.reflect),
            "reflect_candidates": None,
            "answer": out.text,
            "defaults_from_checkpoint": self.pipe.sampling_defaults,
        }
        stem = f"chat_{s.seed}_{uuid.uuid4().hex[:8]}"
        first = out.rounds[0].judged if out.rounds else out.images[0]
        reply.drawing = self._write(first, f"{stem}_round0.png", {**params, "round": 0})
        k = 0
        for r in out.rounds:
            path = None
            if r.image is not None:
                k += 1
                path = self._write(r.image, f"{stem}_round{k}.png", {**params, "round": k})
            reply.rounds.append(RoundShown(r.verdict, r.answer, r.fix, path))
        reply.final = self._write(out.images[0], f"{stem}.png", params)
        reply.kept = out.kept
        return reply


def _in_range(name: str, value, lo, hi) -> None:
    if value is None or not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")


def _check_size(width, height) -> None:
    for name, v in (("width", width), ("height", height)):
        _in_range(name, v, *SIZE_RANGE)
        if int(v) != v or int(v) % 16:
            raise ValueError(f"{name} must be a multiple of 16, got {v}")


@dataclass
class Examples:
    """Prompts that suit the loaded model: (prompt, input image paths) for each view."""

    create: list[tuple[str, list[str]]]
    chat: list[tuple[str, list[str]]]


def examples_for(session: Session) -> Examples:
    """The bundled Shapes World model knows only its grammar (docs/SHAPES.md): the README's measured prompt and
    edit ("a red square at the top left", then "move the red square to the bottom right": 18 and 19 of 20 seeds),
    the edit's input being the model's own drawing of the first; a description question and a drawing for the
    chat. Other checkpoints get the original's kinds of prompts."""
    if session.pipe.domain != "shapes":
        return Examples(
            create=[
                ("A photo of a corgi astronaut on the moon, detailed, cinematic lighting", []),
                ("A watercolour painting of a lighthouse on a cliff at sunset", []),
            ],
            chat=[("Draw a red fox sitting in the snow, then describe it", [])],
        )
    d = session.defaults()
    first = "a red square at the top left"
    settings = CreateSettings(
        first, "", d["width"], d["height"], d["text_guidance"], d["image_guidance"], steps=d["steps"], seed=0
    )
    drawn = str(session.generate(settings, []).pop())  # about 0.3 s on a CPU core
    return Examples(
        create=[
            (first, []),
            ("move the red square to the bottom right", [drawn]),
            ("a red square on a sky background", []),
            ("change the background to sky", [drawn]),
        ],
        chat=[("describe the image.", [drawn]), ("a red square on a sky background", [])],
    )
