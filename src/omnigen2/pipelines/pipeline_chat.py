"""OmniGen2 chat: the MLLM answers in text or decides to draw, and the image is conditioned on that same pass.

The MLLM (Qwen2.5-VL) reads the conversation with its images through the ViT, in the original chat pipeline's
template, and decodes an answer with a KV cache. When it emits ``<|img|>``, the diffusion transformer draws from
the last-layer hidden states of that pass — the prompt positions from the prefill, each generated token from the
decode step that fed it — keeping the text tokens only. The original chat pipeline runs a second MLLM pass over
the same tokens to get these states; tests/pipelines/test_chat.py checks that they agree. docs/CHAT.md has the
details, the reflection loop and the differences from the original. How the MLLM is asked to judge a drawing is the
checkpoint's reflection protocol (``reflection.py``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from ..errors import LimitError
from ..images import check_image
from ..limits import check_float, check_int
from ..models.transformer_omnigen2 import MAX_REF_IMAGES
from .pipeline_omnigen2 import SYSTEM_PROMPT, OmniGen2Pipeline
from .reflection import ReflectionProtocol, resolve_protocol

IMG_TOKEN = "<|img|>"  # the assistant's "draw now" token
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", IMG_TOKEN)  # the original's stop strings
DEFAULT_MAX_NEW_TOKENS = 256  # the original's limit
IMAGE_OUTPUT_TYPES = ("pil", "np", "pt")
# Arguments the chat pipeline sets itself on the generation call.
RESERVED_IMAGE_KWARGS = frozenset(
    {
        "prompt",
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
        "input_images",
        "output_type",
        "return_dict",
        "num_images_per_prompt",
    }
)

# A logits processor: (decode step, the answer's token ids so far, next-token logits (1, V) in fp32) -> logits.
LogitsProcessor = Callable[[int, list[int], torch.Tensor], torch.Tensor]


@dataclass
class Turn:
    """One exchange of the conversation: the user's prompt and input images, the assistant's answer (with
    ``<|img|>`` where it drew) and the images it drew."""

    prompt: str
    images: list[PIL.Image.Image] = field(default_factory=list)
    answer: str = ""
    generated: list[PIL.Image.Image] = field(default_factory=list)


@dataclass
class ReflectionRound:
    """One round of reflection: the MLLM judged ``judged`` against the instruction; on a mismatch ``image`` is the
    result of editing ``judged`` with ``fix`` (``pixels``: the same as a (1, 3, H, W) float tensor in [0, 1]).
    ``verdict``: "match", "mismatch" or "unparsed"."""

    question: str
    judged: PIL.Image.Image
    answer: str
    verdict: str
    problem: str | None = None
    fix: str | None = None
    image: PIL.Image.Image | None = None
    pixels: torch.Tensor | None = field(default=None, repr=False)
    # With several repair candidates per round: every candidate edit (the chosen ``image`` among them), the MLLM's
    # verdict on each and its match score (``OmniGen2ChatPipeline.judge_scored``); empty with one candidate.
    candidates: list[PIL.Image.Image] = field(default_factory=list, repr=False)
    candidate_verdicts: list[str] = field(default_factory=list)
    candidate_scores: list[float] = field(default_factory=list)


@dataclass
class ChatOutput:
    """``text``: the answer (``<|img|>`` kept where the assistant drew, as the original returns it);
    ``images``: the drawn images after reflection (PIL, an array or a tensor per ``output_type``; empty for a
    text answer); ``rounds``: the reflection rounds; ``input_ids`` (1, L): the tokens of the pass (conversation
    and answer, without the stop token); ``prompt_embeds`` (1, T, D) / ``prompt_attention_mask`` (1, T): the
    conditioning the image was drawn from (None for a text answer); ``kept``: which version ``images`` holds after
    reflection (0: the drawing, k: the k-th repair, the one the MLLM judged a match)."""

    text: str
    images: Any = field(default_factory=list)
    rounds: list[ReflectionRound] = field(default_factory=list)
    kept: int = 0
    input_ids: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    prompt_attention_mask: torch.Tensor | None = None


@dataclass
class MllmPass:
    """One cached MLLM pass: every token fed to the model and its last-layer hidden state."""

    input_ids: torch.Tensor  # (1, L): conversation, assistant prefix, generated tokens (the stop token is not fed)
    hidden: torch.Tensor  # (1, L, D)
    answer_ids: list[int]  # the assistant's tokens: prefix and generated, the stop token included
    stop: int | None  # the stop token that ended the answer; None when max_new_tokens ran out


def image_slot(index: int, num_tokens: int) -> str:
    """The original's image slot in a user message: ``<imgN>: <|vision_start|><|image_pad|>...<|vision_end|>``,
    the pad repeated once per merged ViT patch (the Qwen processor's expansion)."""
    return f"<img{index}>: <|vision_start|>" + "<|image_pad|>" * num_tokens + "<|vision_end|>"


class OmniGen2ChatPipeline:
    """Chat with OmniGen2: text answers, image generation and editing decided by the MLLM, a multi-turn
    ``history`` and an optional reflection loop. Wraps an :class:`OmniGen2Pipeline` and shares its components.

    ``reflection``: how the MLLM judges its drawings, a :class:`ReflectionProtocol` or a registered name; None: the
    one the checkpoint names in model_index.json (``omnigen2_reflection``), else ``"prompted"``."""

    def __init__(self, pipe: OmniGen2Pipeline, reflection: str | ReflectionProtocol | None = None):
        if not isinstance(pipe, OmniGen2Pipeline):
            raise TypeError(f"OmniGen2ChatPipeline wraps an OmniGen2Pipeline, got {type(pipe).__name__}")
        self.pipe = pipe
        self.history: list[Turn] = []
        tok = pipe.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in STOP_TOKENS}
        # A token the vocabulary lacks maps to None or the unknown token; it can then never be emitted.
        self.stop_ids = {i for i in ids.values() if i is not None and i != tok.unk_token_id}
        self.img_token_id = ids[IMG_TOKEN] if ids[IMG_TOKEN] in self.stop_ids else None
        self.image_token_id = self.mllm.config.image_token_id  # <|image_pad|>
        self._vision_processor = None
        self._adapter_layers = attach_reflection_adapter(self.mllm, pipe.reflection_adapter)
        self.reflection_protocol = reflection

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, torch_dtype=None, device=None, reflection=None, **kwargs
    ) -> OmniGen2ChatPipeline:
        """Load the released layout (or ``"builtin:NAME"``) through :meth:`OmniGen2Pipeline.from_pretrained`."""
        pipe = OmniGen2Pipeline.from_pretrained(
            pretrained_model_name_or_path, torch_dtype=torch_dtype, device=device, **kwargs
        )
        return cls(pipe, reflection=reflection)

    @property
    def reflection_protocol(self) -> ReflectionProtocol:
        """The question the judge asks, the reading of its answers and the verdict texts scoring reads."""
        return self._reflection_protocol

    @reflection_protocol.setter
    def reflection_protocol(self, choice: str | ReflectionProtocol | None) -> None:
        self._reflection_protocol = resolve_protocol(choice, self.pipe._model_index_extra)
        self.__dict__.pop("_verdict_fork", None)  # tokenized from the protocol's verdict texts

    # -- the shared components ------------------------------------------------------------------------------

    @property
    def mllm(self):
        return self.pipe.mllm

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def to(self, *args, **kwargs) -> OmniGen2ChatPipeline:
        self.pipe.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def reset(self) -> None:
        """Forget the conversation."""
        self.history.clear()

    @property
    def vision_processor(self):
        """The checkpoint's Qwen2-VL image processor (processor/preprocessor_config.json), without torchvision."""
        if self._vision_processor is None:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            raw = self.pipe._processor_files.get("preprocessor_config.json")
            if raw is None:
                raise ValueError(
                    "the checkpoint has no processor/preprocessor_config.json, so the MLLM cannot be shown images"
                )
            cfg = {k: v for k, v in json.loads(raw).items() if k not in ("image_processor_type", "processor_class")}
            self._vision_processor = Qwen2VLImageProcessorPil(**cfg)
        return self._vision_processor

    # -- the conversation as MLLM input ---------------------------------------------------------------------

    def build_inputs(self, turns: list[Turn]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The conversation (the last turn unanswered) -> input ids (1, L) and the ViT inputs (``pixel_values``,
        ``image_grid_thw``; empty without images). The template is the original chat pipeline's: the generation
        system prompt, each user message as image slots then the prompt, and the assistant generation prompt.
        Images are numbered through the conversation (``<img1>``, ``<img2>``, ...); an assistant message holds
        its answer followed by the slots of the images it drew."""
        images = [im for t in turns for im in (*t.images, *t.generated)]
        vision: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if images:
            proc = self.vision_processor
            vision = dict(proc(images=images, return_tensors="pt"))
            counts = (vision["image_grid_thw"].prod(-1) // proc.merge_size**2).tolist()
        slots = iter(image_slot(k + 1, n) for k, n in enumerate(counts))
        text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        for k, t in enumerate(turns):
            user = "".join(next(slots) for _ in t.images) + t.prompt
            text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            if k < len(turns) - 1:
                text += t.answer + "".join(next(slots) for _ in t.generated) + "<|im_end|>\n"
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids, {k: vision[k] for k in ("pixel_values", "image_grid_thw") if k in vision}

    # -- one MLLM pass --------------------------------------------------------------------------------------

    @torch.no_grad()
    def run_mllm(
        self,
        input_ids: torch.Tensor,
        vision: dict[str, torch.Tensor],
        assistant_prefix: str = "",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> MllmPass:
        """Prefill the conversation (and the teacher-forced ``assistant_prefix``), then decode until a stop token
        or ``max_new_tokens``, keeping the last-layer hidden state of every token fed. Greedy unless
        ``temperature > 0`` (then nucleus sampling with ``top_p``, drawn from ``generator``)."""
        mllm, device = self.mllm, self.device
        prefix = self.tokenizer(assistant_prefix, add_special_tokens=False).input_ids if assistant_prefix else []
        stop = next((t for t in prefix if t in self.stop_ids), None)
        if stop is not None:  # a stop token in the prefix ends the answer there (e.g. "<|img|>": draw at once)
            prefix = prefix[: prefix.index(stop) + 1]
        fed = prefix[:-1] if stop is not None else prefix
        ids = torch.cat([input_ids, torch.tensor([fed], dtype=input_ids.dtype)], dim=1).to(device)  # (1, L)

        # 1. Positions: Qwen2.5-VL's 3D RoPE over the vision tokens, the text counting on after each image
        positions, delta, vision = self._positions(ids, vision)

        # 2. Prefill: the conversation and the prefix in one call, through the model's forward (hooks apply)
        out = mllm(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
            **vision,
        )
        hidden = [out.hidden_states[-1]]  # [(1, L, D)], then one (1, 1, D) per decode step
        answer = list(prefix)

        # 3. Decode with the KV cache; each generated token's state comes from the step that feeds it
        for step in range(max_new_tokens if stop is None else 0):
            logits = out.logits[:, -1].float()  # (1, V)
            if logits_processor is not None:
                logits = logits_processor(step, answer, logits)
            token = _pick(logits, temperature, top_p, generator)
            answer.append(token)
            if token in self.stop_ids:
                stop = token
                break
            if step == max_new_tokens - 1:
                break  # out of tokens: this one's state is never needed
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            pos = torch.full((3, 1, 1), ids.shape[1] - 1 + delta, device=device)  # (3, B, 1)
            cache = {self._cache_kwarg: out[self._cache_kwarg]}
            out = mllm(input_ids=ids[:, -1:], position_ids=pos, use_cache=True, output_hidden_states=True, **cache)
            hidden.append(out.hidden_states[-1])
        return MllmPass(ids, torch.cat(hidden, dim=1), answer, stop)

    def _positions(self, ids: torch.Tensor, vision: dict) -> tuple[torch.Tensor, int, dict]:
        """The (3, 1, L) RoPE positions of ``ids`` (1, L), the offset of the text positions after the images, and
        the ViT inputs on the device. Set here rather than left to the model, whose stored rope offset would
        outlive this conversation."""
        mllm, device = self.mllm, self.device
        if not vision:
            return torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, 1, -1), 0, {}
        mm_types = (ids == self.image_token_id).int()
        grid = vision["image_grid_thw"].to(device)
        positions, delta = mllm.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid)
        vision = {"pixel_values": vision["pixel_values"].to(device, mllm.dtype), "image_grid_thw": grid}
        return positions, int(delta), vision  # delta (1, 1): text positions after the images are offset by this

    @functools.cached_property
    def _cache_kwarg(self) -> str:
        """The MLLM's name for its KV cache, in and out: ``cache`` since transformers renamed ``past_key_values``
        (the old name still works there but warns on every decode step), ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(self.mllm.forward).parameters else "past_key_values"

    def conditioning(self, mllm_pass: MllmPass) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's text conditioning from a pass: the hidden states of every fed token but the image pads —
        the conversation and the answer before ``<|img|>`` — as the original's second pass keeps them.
        Returns (1, T, D) in the MLLM's dtype and a (1, T) mask of ones."""
        keep = mllm_pass.input_ids[0] != self.image_token_id  # (L,)
        embeds = mllm_pass.hidden[:, keep].to(self.mllm.dtype)  # (1, T, D)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    @torch.no_grad()
    def drawing_conditioning(
        self, prompt: str, images: list[PIL.Image.Image] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning of a fresh one-turn conversation answered ``<|img|>`` at once: what ``__call__`` draws
        from with ``assistant_prefix="<|img|>"``, the images shown to the MLLM. The trainer conditions its
        ``data.chat_images`` samples on it, so the transformer learns the chat form of an edit or in-context
        instruction. (1, T, D) and a (1, T) mask of ones."""
        self._check_prompt(prompt)
        ids, vision = self.build_inputs([Turn(prompt, self._check_images(images))])
        self._check_conversation(ids)
        return self.conditioning(self.run_mllm(ids, vision, IMG_TOKEN))

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """The negative branch as the original chat pipeline encodes it: the one-turn chat template of the
        negative prompt, assistant generation prompt included, text only. (1, T, D) and a (1, T) mask."""
        ids, _ = self.build_inputs([Turn(negative_prompt)])
        ids = ids.to(self.device)
        mask = torch.ones_like(ids)
        out = self.mllm(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states[-1].to(self.mllm.dtype), mask

    def _decode_text(self, ids: list[int]) -> str:
        """The answer's text with special tokens kept (``<|img|>`` marks a drawing), the end-of-turn dropped."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for t in STOP_TOKENS[:2]:
            text = text.replace(t, "")
        return text

    # -- reflection -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def judge(self, image: PIL.Image.Image, instruction: str, max_new_tokens: int | None = None) -> str:
        """Ask the MLLM, in a fresh one-turn conversation, whether ``image`` matches ``instruction`` (the
        protocol's question); its greedy answer, special tokens removed, at most ``max_new_tokens`` long (None:
        the protocol's length)."""
        return self.judge_scored(image, instruction, max_new_tokens)[0]

    @torch.no_grad()
    def judge_scored(
        self, image: PIL.Image.Image, instruction: str, max_new_tokens: int | None = None
    ) -> tuple[str, float]:
        """:meth:`judge`'s answer and how sure the MLLM is of a match. With a protocol that has verdict texts: at
        the token where they part ("the image| matches" against "the image| does not match"), the log-probability
        of the match branch minus the mismatch branch's (-inf when the greedy answer never reaches that token).
        Without (free-text answers): the greedy verdict's sign, +1 for a match, -1 for a mismatch, -inf for an
        unparsed answer. Ranks repairs the MLLM rejected all of."""
        protocol = self.reflection_protocol
        ids, vision = self.build_inputs([Turn(protocol.question(instruction), [image])])
        fork, score = self._verdict_fork, [float("-inf")]

        def watch(step: int, answer: list[int], logits: torch.Tensor) -> torch.Tensor:
            shared, match_id, mismatch_id = fork
            if step == len(shared) and answer == shared:
                logp = logits.log_softmax(-1)[0]  # (V,)
                score[0] = float(logp[match_id] - logp[mismatch_id])  # judging is outside the denoising loop
            return logits

        limit = protocol.max_new_tokens if max_new_tokens is None else max_new_tokens
        processor = None if fork is None else watch
        with self.answering():
            answer = self.run_mllm(ids, vision, max_new_tokens=limit, logits_processor=processor).answer_ids
        text = self.tokenizer.decode(answer, skip_special_tokens=True).strip()
        if fork is None:
            score[0] = {"match": 1.0, "mismatch": -1.0}.get(protocol.parse(text)[0], float("-inf"))
        return text, score[0]

    @functools.cached_property
    def _verdict_fork(self) -> tuple[list[int], int, int] | None:
        """The tokens both verdicts of the protocol start with, and the first token of each after them (match,
        mismatch); None for a free-text protocol. Tokenized once per pipeline, as every judgement reads it."""
        return self.reflection_protocol.fork(self.tokenizer)

    @contextlib.contextmanager
    def answering(self):
        """The checkpoint's answering adapter (``mllm_reflection/``: understanding and judging) switched on, when
        it has one, for the enclosed MLLM calls only."""
        _set_adapters(self._adapter_layers, True)
        try:
            yield
        finally:
            _set_adapters(self._adapter_layers, False)

    def reflect(
        self, image, instruction: str, rounds: int, generator=None, candidates: int = 1, **image_kwargs
    ) -> list[ReflectionRound]:
        """Judge ``image`` against ``instruction``; on a mismatch (as the protocol reads the answer, e.g. "does not
        match: {problem}. {fix}") edit it with ``fix`` through the editing path (OmniGen2Pipeline, the image as
        input) and judge the repair; at most ``rounds`` repairs, every one judged (so at most ``rounds + 1``
        judgements). A match or an unparsed answer ends the loop. With ``candidates=k`` each repair is drawn k
        times (one batch, k noises) and every candidate judged: the repair is the one the MLLM scores highest
        (:meth:`judge_scored`), among those it judges a match when there are any (which ends the loop), else among
        all (the next round starts from it)."""
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        protocol = self.reflection_protocol
        record, question = [], protocol.question(instruction)
        answer = self.judge_scored(image, instruction)[0]
        for k in range(rounds + 1):
            verdict, problem, fix = protocol.parse(answer)
            step = ReflectionRound(question, image, answer, verdict, problem, fix)
            record.append(step)
            if verdict != "mismatch" or k == rounds:
                break
            pixels = self.pipe(
                prompt=fix,
                input_images=[image],
                generator=generator,
                num_images_per_prompt=candidates,
                output_type="pt",
                **image_kwargs,
            ).images  # (k, 3, H, W)
            tried = _to_pil(pixels)
            judged = [self.judge_scored(c, instruction) for c in tried]
            verdicts = [protocol.parse(a)[0] for a, _ in judged]
            # the candidate the MLLM is surest matches: among those judged a match if any, else among all
            chosen = max(range(candidates), key=lambda i: (verdicts[i] == "match", judged[i][1]))
            answer = judged[chosen][0]  # the next round's judgement of the repair
            if candidates > 1:
                step.candidates, step.candidate_verdicts = tried, verdicts
                step.candidate_scores = [s for _, s in judged]
            step.pixels, image = pixels[chosen : chosen + 1], tried[chosen]
            step.image = image
        return record

    # -- the call -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        input_images: list[PIL.Image.Image] | None = None,
        reflect: int = 0,
        reflect_candidates: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        text_guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        negative_prompt: str | None = None,
        assistant_prefix: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        logits_processor: LogitsProcessor | None = None,
        output_type: str = "pil",
        **image_kwargs,
    ) -> ChatOutput:
        """One turn of the conversation in ``history``. The MLLM answers ``prompt`` (about ``input_images``, at
        most 5); if it emits ``<|img|>``, an image is drawn from the same pass's states with the input images as
        references, then, with ``reflect=N``, judged and repaired for up to N rounds (``reflect_candidates``:
        repairs drawn per round, :meth:`reflect`; None: the checkpoint's ``reflect_candidates``, else 1).
        ``assistant_prefix`` is teacher-forced as the start of the answer (``"<|img|>"`` forces a drawing).
        Sampling settings left None come from the checkpoint, as in OmniGen2Pipeline; ``image_kwargs``
        (``cfg_range``, ``max_pixels``, ``scheduler``, ...) go to its generation call."""
        # 1. Check the arguments; the sampling settings of the drawing and of its repairs
        images, reflect_candidates = self._check_call(
            prompt, input_images, reflect, reflect_candidates, max_new_tokens, output_type, image_kwargs
        )
        sampling = dict(
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            text_guidance_scale=text_guidance_scale,
            image_guidance_scale=image_guidance_scale,
            **image_kwargs,
        )
        self._check_sampling(sampling, temperature, top_p)

        # 2. One MLLM pass over the conversation: the answer, and the states of every token fed
        turn = Turn(prompt, images)
        decode = (assistant_prefix, max_new_tokens, temperature, top_p, generator, logits_processor)
        mllm_pass = self._answer([*self.history, turn], decode)
        turn.answer = self._decode_text(mllm_pass.answer_ids)
        result = ChatOutput(text=turn.answer, input_ids=mllm_pass.input_ids)

        if self.img_token_id is not None and mllm_pass.stop == self.img_token_id:
            # 3. "<|img|>": draw from that pass's states, the input images as references
            drawn = self._draw(mllm_pass, images, negative_prompt, generator, sampling, result)
            # 4. Reflection: judge the drawing against the instruction, edit it with the suggested fix
            if reflect > 0:
                result.rounds = self.reflect(
                    _to_pil(drawn)[0], prompt, reflect, generator, reflect_candidates, **sampling
                )
            # 5. Keep the version the MLLM accepted
            drawn = self._keep(drawn, result)
            turn.generated = _to_pil(drawn)
            result.images = _convert(drawn, output_type)
        self.history.append(turn)
        return result

    def _check_call(self, prompt, input_images, reflect, candidates, max_new_tokens, output_type, image_kwargs):
        """The call's arguments checked against their types, ranges and ``pipe.limits``; the input images as a
        list and the repair candidates per round."""
        limits = self.pipe.limits
        self._check_prompt(prompt)
        images = self._check_images(input_images)
        reflect = check_int("reflect", reflect, least=0)
        limits.check("reflect", reflect, f"reflect={reflect}")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, least=0)
        limits.check("new_tokens", max_new_tokens, f"max_new_tokens={max_new_tokens}")
        if candidates is None:
            candidates = self.pipe.sampling_defaults.get("reflect_candidates", 1)
        candidates = check_int("reflect_candidates", candidates, least=1)
        limits.check("images_per_prompt", candidates, f"reflect_candidates={candidates}")
        if output_type not in IMAGE_OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(IMAGE_OUTPUT_TYPES)}, got {output_type!r}")
        reserved = RESERVED_IMAGE_KWARGS & set(image_kwargs)
        if reserved:
            raise TypeError(f"the chat pipeline sets {', '.join(sorted(reserved))} itself")
        return images, candidates

    def _check_sampling(self, sampling: dict, temperature, top_p) -> None:
        """The drawing's settings checked before the MLLM runs (the generation call checks them again)."""
        check_float("temperature", temperature, least=0.0)
        check_float("top_p", top_p, least=0.0, most=1.0)
        if top_p <= 0:
            raise ValueError(f"top_p must be > 0, got {top_p}")
        self.pipe._resolve_settings(
            sampling["num_inference_steps"], sampling["text_guidance_scale"], sampling["image_guidance_scale"],
            sampling["height"], sampling["width"], sampling.get("cfg_range", (0.0, 1.0)), 1, "pt",
            sampling.get("teacache"), sampling.get("taylorseer"),
        )  # fmt: skip

    def _check_prompt(self, prompt) -> None:
        """A chat prompt is refused, not truncated, beyond ``limits.prompt_chars``: its end is the question."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (one turn), got {type(prompt).__name__}")
        self.pipe.limits.check("prompt_chars", len(prompt), f"the prompt of {len(prompt)} characters")

    def _check_conversation(self, ids: torch.Tensor) -> None:
        """The conversation's text tokens (the image pads aside), which the drawing is conditioned on, within
        ``limits.prompt_tokens``; checked before the MLLM runs."""
        text_tokens = int((ids != self.image_token_id).sum())
        self.pipe.limits.check("prompt_tokens", text_tokens, f"the conversation's {text_tokens} text tokens")

    def _answer(self, turns: list[Turn], decode: tuple) -> MllmPass:
        """The MLLM pass answering the last turn (``decode``: :meth:`run_mllm`'s arguments after the inputs)."""
        ids, vision = self.build_inputs(turns)
        self._check_conversation(ids)
        mllm_pass = self.run_mllm(ids, vision, *decode)
        if self._adapter_layers and mllm_pass.stop != self.img_token_id:
            # A text answer is decoded again with the answering adapter on (understanding and judging are
            # taught to it; the plain MLLM decides whether to draw and conditions the drawing). Should the
            # adapter's answer end in <|img|>, the plain answer stands: drawings come from plain states only.
            with self.answering():
                adapted = self.run_mllm(ids, vision, *decode)
            if adapted.stop != self.img_token_id:
                mllm_pass = adapted
        return mllm_pass

    def _draw(self, mllm_pass: MllmPass, images, negative_prompt, generator, sampling: dict, result: ChatOutput):
        """The drawing conditioned on the pass's states, (1, 3, H, W) in [0, 1]; its conditioning goes to
        ``result``."""
        embeds, mask = self.conditioning(mllm_pass)
        neg = neg_mask = None
        tgs = sampling["text_guidance_scale"]
        if (tgs if tgs is not None else self.pipe.sampling_defaults.get("text_guidance_scale", 4.0)) > 1.0:
            neg, neg_mask = self.encode_negative(negative_prompt or "")
        result.prompt_embeds, result.prompt_attention_mask = embeds, mask
        return self.pipe(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt_embeds=neg,
            negative_prompt_attention_mask=neg_mask,
            input_images=images or None,
            generator=generator,
            output_type="pt",
            **sampling,
        ).images  # (1, 3, H, W) in [0, 1]

    @staticmethod
    def _keep(drawn: torch.Tensor, result: ChatOutput) -> torch.Tensor:
        """The version reflection keeps, recorded in ``result.kept``. Round k judged version k (0: the drawing, k:
        the k-th repair). A repair is kept only when the MLLM judged it a match: repairs go through the editing
        path and can break what was right, so one it did not accept is no evidence of an improvement
        (docs/CHAT.md, "Reflection")."""
        versions = [drawn, *(r.pixels for r in result.rounds if r.pixels is not None)]
        result.kept = next((k for k, r in enumerate(result.rounds) if r.verdict == "match"), 0)
        return versions[result.kept]

    def _check_images(self, input_images) -> list[PIL.Image.Image]:
        if input_images is None:
            return []
        if isinstance(input_images, PIL.Image.Image):
            input_images = [input_images]
        if not isinstance(input_images, (list, tuple)):
            raise TypeError(f"input_images must be a list of PIL images, got {type(input_images).__name__}")
        bound = min(self.pipe.limits.input_images, MAX_REF_IMAGES)
        if len(input_images) > bound:
            raise LimitError(f"{len(input_images)} input images; OmniGen2 takes at most {bound} per turn")
        return [check_image(im, name=f"input image {k}") for k, im in enumerate(input_images)]


def attach_reflection_adapter(mllm, adapter: dict | None) -> list:
    """Inject the reflection LoRA adapter into ``mllm`` (peft) and switch it off; returns its LoRA layers.

    The MLLM stays frozen for the diffusion transformer, whose text conditioning comes from it: answering about
    images (understanding, judging the model's own images) is taught to an adapter that is on only for text
    answers and judging turns (``answering()``)."""
    if not adapter:
        return []
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    fields = LoraConfig.__dataclass_fields__
    config = LoraConfig(**{k: v for k, v in adapter["config"].items() if k in fields and k != "peft_type"})
    inject_adapter_in_model(config, mllm, adapter_name="reflection")
    result = set_peft_model_state_dict(mllm, adapter["state_dict"], adapter_name="reflection")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"reflection adapter keys not in the MLLM: {result.unexpected_keys[:5]}")
    layers = [m for m in mllm.modules() if isinstance(m, BaseTunerLayer)]
    _set_adapters(layers, False)
    return layers


def _set_adapters(layers: list, enabled: bool) -> None:
    for layer in layers:
        layer.enable_adapters(enabled)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token from (1, V) fp32 logits: the argmax, or a nucleus sample at ``temperature``."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    probs = torch.softmax(logits / temperature, dim=-1)  # (1, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the most likely token always stays in
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images, rounded as OmniGen2Pipeline's "pil" output."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))


def _convert(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images
    from diffusers.image_processor import VaeImageProcessor

    arrays = VaeImageProcessor.pt_to_numpy(images)
    return arrays if output_type == "np" else VaeImageProcessor.numpy_to_pil(arrays)


__all__ = [
    "ChatOutput",
    "MllmPass",
    "OmniGen2ChatPipeline",
    "ReflectionRound",
    "Turn",
    "image_slot",
]
