"""The judge: any OpenAI-compatible vision chat endpoint (``POST {url}/chat/completions``), asked for prompt
following (PF) and subject consistency (SC) of one generated image, each a JSON object
``{"score": number | [numbers], "reasoning": str}`` on a 0 to 10 scale.

- The request shows the rubric text, then the input images, then the output, each resized as the original's
  evaluation does (at most 1024 x 1024 pixels, sides floored to multiples of 16) and sent as a PNG data URL.
- Transport: a bounded pool of threads; 429, 5xx, timeouts and connection errors are retried with exponential
  backoff (``Retry-After`` honoured); other HTTP errors fail the judgement at once.
- Every reply body is cached on disk under the SHA-256 of the request (model, messages, options) and the attempt
  number, before it is parsed, so a rerun replays what it has and pays only for what is missing.
- A reply that does not parse is asked again (attempt 1, 2, ...: the same request, a new cache entry); when the
  last attempt fails too the judgement is a failure with the reason, never a score.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

DIMENSIONS = ("prompt_following", "subject_consistency")
SHORT = {"prompt_following": "PF", "subject_consistency": "SC"}
MAX_JUDGE_PIXELS = 1024 * 1024  # as the original's evaluation: images are shrunk to this many pixels at most
JUDGE_MULTIPLE = 16  # ... and their sides floored to multiples of 16
DEFAULT_API_KEY_ENV = "OMNIGEN2_JUDGE_API_KEY"
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class ReplyError(ValueError):
    """A judge reply that is not a usable score."""


# -- templates ---------------------------------------------------------------------------------------------------


def load_templates(path: str | os.PathLike | None = None) -> dict:
    """The rubric: ``{"name", "prompt_following": {"system", "user"}, "subject_consistency": {...}}``; the
    ``user`` texts may use ``$instruction`` and ``$n_inputs``. None: the bundled rubric (rubric.json)."""
    if path is None:
        text = resources.files(__package__).joinpath("rubric.json").read_text(encoding="utf-8")
        where = "the bundled rubric"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    try:
        rubric = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e.msg} (line {e.lineno})") from None
    for dim in DIMENSIONS:
        part = rubric.get(dim) if isinstance(rubric, dict) else None
        if not isinstance(part, dict) or not isinstance(part.get("user"), str):
            raise ValueError(f'{where}: needs "{dim}": {{"system": str, "user": str}}')
        if not isinstance(part.get("system", ""), str):
            raise ValueError(f'{where}: "{dim}"."system" must be a string')
    rubric.setdefault("name", Path(where).stem if path is not None else "omnigen2")
    return rubric


# -- images ------------------------------------------------------------------------------------------------------


def judge_size(width: int, height: int) -> tuple[int, int]:
    """The size the judge sees: scaled down to at most MAX_JUDGE_PIXELS, sides floored to multiples of 16."""
    scale = min(1.0, math.sqrt(MAX_JUDGE_PIXELS / (width * height)))
    m = JUDGE_MULTIPLE
    return max(m, int(width * scale) // m * m), max(m, int(height * scale) // m * m)


def data_url(path: str | os.PathLike) -> str:
    """The image at ``path`` as the judge sees it: RGB, resized by :func:`judge_size`, a PNG data URL."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    size = judge_size(*im.size)
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_request(model: str, rubric: dict, dim: str, instruction: str, inputs, output) -> dict:
    """The chat-completions body for one dimension of one sample: the rubric, the inputs, then the output."""
    part = rubric[dim]
    text = Template(part["user"]).safe_substitute(instruction=instruction, n_inputs=len(inputs))
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in [*inputs, output]]
    messages = [{"role": "system", "content": part["system"]}] if part.get("system") else []
    return {"model": model, "messages": [*messages, {"role": "user", "content": content}], "temperature": 0}


# -- replies -----------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def reply_text(body: str) -> str:
    """The assistant's text in a chat-completions response body."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ReplyError(f"not a chat completion: {body[:120]!r}") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ReplyError("the completion has no text")
    return content


def parse_score(text: str) -> tuple[float, list[float], str]:
    """(score, the scores as given, reasoning) of a reply: a JSON object, bare or in a fenced block, whose
    ``score`` is a number or a non-empty list of numbers in [0, 10]. A list scores its minimum (each entry judges
    one subject or one requirement; the weakest decides, as in VIEScore, the original's scoring)."""
    stripped = text.strip()
    fenced = _FENCE.search(stripped)
    candidate = fenced.group(1).strip() if fenced and not stripped.startswith("{") else stripped
    try:
        obj = json.loads(candidate)
    except json.JSONDecodeError:
        raise ReplyError(f"no JSON object in the reply: {text[:120]!r}") from None
    if not isinstance(obj, dict) or "score" not in obj:
        raise ReplyError(f'the reply has no "score": {text[:120]!r}')
    raw = obj["score"]
    scores = raw if isinstance(raw, list) else [raw]
    ok = scores and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s <= 10 for s in scores
    )
    if not ok:
        raise ReplyError(f'"score" must be a number or a list of numbers in [0, 10], got {raw!r}')
    reasoning = obj.get("reasoning", "")
    reasoning = reasoning if isinstance(reasoning, str) else json.dumps(reasoning)
    return float(min(scores)), [float(s) for s in scores], reasoning


# -- cache -------------------------------------------------------------------------------------------------------


def request_key(payload: dict, attempt: int) -> str:
    blob = json.dumps({"request": payload, "attempt": attempt}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    """Reply bodies on disk, one file per (request, attempt): ``DIR/ab/abcdef....json``, written atomically."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["body"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, body: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"body": body}), encoding="utf-8")
        tmp.replace(path)


# -- the client --------------------------------------------------------------------------------------------------


@dataclass
class JudgeConfig:
    """Where the judge is and how it is asked. ``api_key`` comes from an environment variable, never a flag."""

    url: str  # the API base (".../v1") or the full ".../chat/completions" address
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 4  # requests in flight at once
    timeout: float = 120.0  # seconds per request
    retries: int = 6  # more tries of one request after 429 / 5xx / timeouts
    parse_retries: int = 2  # more replies asked for when one does not parse
    backoff: float = 2.0  # seconds before the first retry; doubled each time, with jitter
    max_backoff: float = 60.0

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


@dataclass
class Judgement:
    score: float | None  # None: a failure
    scores: list[float] = field(default_factory=list)
    reasoning: str = ""
    error: str | None = None
    requests: int = 0  # sent over the network (0: every reply came from the cache)


class Judge:
    """Asks the endpoint, through the cache; thread-safe (one ``httpx.Client`` shared by the workers)."""

    def __init__(self, config: JudgeConfig, cache: ReplyCache):
        import httpx

        self.config, self.cache = config, cache
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.Client(timeout=config.timeout, headers=headers)

    def close(self) -> None:
        self.client.close()

    def __call__(self, payload: dict) -> Judgement:
        sent, last = 0, None
        for attempt in range(self.config.parse_retries + 1):
            key = request_key(payload, attempt)
            body = self.cache.get(key)
            if body is None:
                body, error, tries = self._post(payload)
                sent += tries
                if body is None:  # not cached: a rerun asks again
                    return Judgement(None, error=f"judge request failed: {error}", requests=sent)
                self.cache.put(key, body)
            try:
                score, scores, reasoning = parse_score(reply_text(body))
                return Judgement(score, scores, reasoning, requests=sent)
            except ReplyError as e:
                last = e
        n = self.config.parse_retries + 1
        return Judgement(None, error=f"no usable reply in {n} tries; the last: {last}", requests=sent)

    def _post(self, payload: dict) -> tuple[str | None, str | None, int]:
        """(body, None, requests) of a 200 reply, or (None, why, requests) after the retries."""
        import httpx

        cfg, why = self.config, None
        for i in range(cfg.retries + 1):
            wait = min(cfg.max_backoff, cfg.backoff * 2**i) * (0.5 + random.random() / 2)
            try:
                r = self.client.post(cfg.endpoint, json=payload)
            except httpx.TimeoutException:
                why = f"timed out after {cfg.timeout} s"
            except httpx.TransportError as e:
                why = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.text, None, i + 1
                why = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in RETRY_STATUS:
                    return None, why, i + 1
                after = r.headers.get("retry-after", "")
                if re.fullmatch(r"\d+(\.\d+)?", after.strip()):
                    wait = min(cfg.max_backoff, float(after))
            if i < cfg.retries:
                time.sleep(wait)
        return None, f"{why} ({cfg.retries + 1} tries)", cfg.retries + 1
