"""Request bodies, as pydantic models. Unknown fields are refused (400), so a misspelt or unsupported setting is
never silently ignored. JSON bodies are validated strictly (``"n": "2"`` is refused); multipart forms, whose
values are all strings, are converted.

Field meanings follow OpenAI's API, with OmniGen2's sampling settings as extra fields: ``guidance_scale`` is the
text guidance, ``guidance_scale_2`` (vLLM-Omni's name) or ``image_guidance_scale`` the image guidance. A field
left out takes the checkpoint's sampling setting, as the library does when it gets None.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import APIError, bad_request

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):
    """The sampling settings every endpoint takes."""

    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    negative_prompt: str | None = None
    num_inference_steps: Annotated[int, Field(ge=1)] | None = None
    guidance_scale: Annotated[float, Field(ge=0.0)] | None = None
    guidance_scale_2: Annotated[float, Field(ge=0.0)] | None = None
    image_guidance_scale: Annotated[float, Field(ge=0.0)] | None = None
    # [start, end]: guidance applies at the steps whose fraction i/N lies in it (a list: JSON has no tuples)
    cfg_range: Annotated[list[Annotated[float, Field(ge=0.0, le=1.0)]], Field(min_length=2, max_length=2)] | None = None
    scheduler: Literal["euler", "dpmsolver++"] | None = None
    size: str | None = None  # "WxH" or "auto"

    @model_validator(mode="after")
    def _one_image_guidance(self):
        a, b = self.guidance_scale_2, self.image_guidance_scale
        # raised as API errors (pydantic passes other exceptions through), so that they name their field
        if a is not None and b is not None and a != b:
            raise bad_request(
                "guidance_scale_2 and image_guidance_scale are two names of the image guidance; give one",
                "image_guidance_scale",
            )
        if self.cfg_range is not None and self.cfg_range[0] > self.cfg_range[1]:
            raise bad_request("cfg_range must be [start, end] with start <= end", "cfg_range")
        return self

    @property
    def image_guidance(self) -> float | None:
        return self.guidance_scale_2 if self.guidance_scale_2 is not None else self.image_guidance_scale


class ImageRequest(Sampling):
    """``POST /v1/images/generations`` (JSON) and the fields of ``POST /v1/images/edits`` (multipart)."""

    prompt: str
    model: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    response_format: Literal["b64_json"] | None = None
    output_format: Literal["png"] | None = None
    user: str | None = None  # an end-user id, as OpenAI takes it; not used


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees an image one way only


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, as OpenAI does; the template has no names


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``. Besides OpenAI's fields: ``reflect`` (reflection rounds, docs/CHAT.md),
    ``reflect_candidates``, ``force_image`` (start the answer with ``<|img|>``: always draw), and the sampling
    settings of a drawing."""

    messages: Annotated[list[Message], Field(min_length=1)]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Literal[1] | None = None
    user: str | None = None
    reflect: Annotated[int, Field(ge=0)] = 0
    reflect_candidates: Annotated[int, Field(ge=1)] | None = None
    force_image: bool = False


def validate(model: type[BaseModel], data: object, strict: bool) -> BaseModel:
    """Validate ``data`` against ``model``; a failure becomes a 400 naming the first offending field."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        raise _as_api_error(e) from None


def _as_api_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".") or None
    if err["type"] == "extra_forbidden":
        return bad_request(f"unrecognized request argument: {err['loc'][-1]}", param, code="unknown_parameter")
    if err["type"] == "missing":
        return bad_request(f"missing required parameter: {param}", param, code="missing_required_parameter")
    msg = err["msg"].removeprefix("Value error, ")
    if param and param.startswith("response_format"):
        msg = "only response_format b64_json is served (the server keeps no files to link to)"
    return bad_request(
        f"invalid {param or 'body'}: {msg}" + (f" (got {_short(err.get('input'))})" if param else ""), param
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "WxH" -> (height, width); None or "auto" -> (None, None): the checkpoint's size, or an edit's input size."""
    if size is None or size == "auto":
        return None, None
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise bad_request(f"size must read WIDTHxHEIGHT, e.g. 1024x1024 (got {size!r})", "size")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise bad_request(f"size must be positive, got {size!r}", "size")
    return height, width
