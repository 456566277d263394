"""OmniContext in the Shapes World, for the tests of ``omnigen2 eval omnicontext``: a dataset in the published
layout, and an OpenAI-compatible judge server whose scores come from the Shapes judge.

The Shapes reading of the eight task types: a *character* is an object with a dot (a figure with a face), an
*object* is one without; a subject image holds one of them alone on the gray background; a *scene* is an image
of 1-2 other objects on a colored background, which the output must keep.

- single_character / single_object: "put the object from image 1 at the {cell}";
- multi_character / multi_object / multi_character_object: "put the object from image 1 {relation} the object
  from image 2" (two characters, two objects, a character and an object);
- scene_character / scene_object: "add the object from image 1 to image 2 at the {cell}";
- scene_character_object: "add the object from image 1 at the {cell} and the object from image 2 at the {cell}
  to image 3" (outside the miniature's grammar: it has no three-input scene task; it is judged all the same).

The judge: PF is 10 when the output reads as the target arrangement, 8 - 2 per kind of error when it reads but is
wrong (at least 1), 0 when it does not read; SC is a list, one entry per subject: 10 when an object of the
subject's shape, color and dot is in the output, else 0 (the report takes its minimum).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from omnigen2.eval.omnicontext import TASK_TYPES
from omnigen2.eval.omnicontext.score import METRICS
from omnigen2.shapes.judge import Failure, read
from omnigen2.shapes.render import render
from omnigen2.shapes.tasks import Pattern, Relation, Target
from omnigen2.shapes.world import BACKGROUNDS, CELLS, COLORS, RELATIONS, SHAPES, Object, Scene


@dataclass(frozen=True)
class ShapesCase:
    key: str
    task_type: str
    instruction: str
    inputs: tuple[Scene, ...]
    target: Target


def _kinds(rng: random.Random, k: int, taken=()) -> list[tuple[str, str]]:
    return rng.sample([(c, s) for c in COLORS for s in SHAPES if (c, s) not in set(taken)], k)


def _subject(rng, color: str, shape: str, character: bool) -> Object:
    dot = rng.choice([c for c in COLORS if c != color]) if character else None
    return Object(shape, color, dot, rng.choice(CELLS))


def make_case(task_type: str, index: int) -> ShapesCase:
    rng = random.Random(f"omnicontext-shapes/{task_type}/{index}")
    scope, _, who = task_type.partition("_")
    chars = {"character": [True], "object": [False], "character_object": [True, False]}[who]
    if scope == "multi":
        chars = chars * 2 if len(chars) == 1 else chars
    scene = None
    if scope == "scene":
        bg = rng.choice([b for b in BACKGROUNDS if b != "gray"])
        furniture = [Object(s, c, None, cell) for (c, s), cell in zip(_kinds(rng, 2), rng.sample(CELLS, 2))]
        scene = Scene(tuple(furniture[: rng.randint(1, 2)]), bg)
    taken = {o.kind for o in scene.objects} if scene else set()
    subjects = [_subject(rng, c, s, ch) for (c, s), ch in zip(_kinds(rng, len(chars), taken), chars)]
    alone = tuple(Scene((o,)) for o in subjects)
    if scope == "single":
        cell = rng.choice([c for c in CELLS if c != subjects[0].cell])
        text = f"put the object from image 1 at the {cell}"
        target = Target.exact(Scene((subjects[0].replace(cell=cell),)), subjects=(0,))
        return ShapesCase(f"{index:04d}", task_type, text, alone, target)
    if scope == "multi":
        rel = rng.choice(RELATIONS)
        patterns = tuple(Pattern.of(o, anywhere=True) for o in subjects)
        target = Target(patterns, (Relation(0, rel, 1),), subjects=(0, 1))
        text = f"put the object from image 1 {rel} the object from image 2"
        return ShapesCase(f"{index:04d}", task_type, text, alone, target)
    cells = rng.sample(scene.free_cells(), len(subjects))
    placed = [o.replace(cell=c) for o, c in zip(subjects, cells)]
    after = Scene((*scene.objects, *placed), scene.background)
    target = Target.exact(after, subjects=tuple(after.objects.index(o) for o in placed))
    if len(subjects) == 1:
        text = f"add the object from image 1 to image 2 at the {cells[0]}"
    else:
        text = f"add the object from image 1 at the {cells[0]} and the object from image 2 at the {cells[1]} to image 3"
    return ShapesCase(f"{index:04d}", task_type, text, (*alone, scene), target)


def make_cases(per_type: int = 2) -> list[ShapesCase]:
    """``per_type`` cases of every task type; the judge server tells them apart by instruction and input images."""
    cases = [make_case(t, i) for t in TASK_TYPES for i in range(per_type)]
    assert len({(c.instruction, c.inputs) for c in cases}) == len(cases)
    return cases


def write_jsonl_dataset(cases: list[ShapesCase], folder: Path) -> Path:
    """The published layout as a folder: data.jsonl and images/TASK_TYPE/KEY_I.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        paths = []
        for i, scene in enumerate(case.inputs):
            rel = f"images/{case.task_type}/{case.key}_{i}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            render(scene, np.random.default_rng(i)).save(folder / rel)
            paths.append(rel)
        rows.append({"key": case.key, "task_type": case.task_type, "instruction": case.instruction,
                     "instruction_language": "en", "input_images": paths})  # fmt: skip
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# -- the Shapes judge's scores ---------------------------------------------------------------------------------


def prompt_following(case: ShapesCase, image) -> float:
    scene = read(image)
    if isinstance(scene, Failure):
        return 0.0
    if case.target.check(scene)[0]:
        return 10.0
    return float(max(1, 8 - 2 * len(case.target.wrong(scene))))


def subject_scores(case: ShapesCase, image) -> list[float]:
    scene = read(image)
    objects = [] if isinstance(scene, Failure) else scene.objects
    looks = {o.look for o in objects}
    subjects = [case.target.patterns[i] for i in case.target.subjects]
    return [10.0 if (p.shape, p.color, p.dot) in looks else 0.0 for p in subjects]


# -- the server ------------------------------------------------------------------------------------------------


@dataclass
class JudgeServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 (a free port) answering from the Shapes judge.

    ``fault(n_for_this_request_content, instruction, dimension)`` may return "401", "429", "500", "malformed",
    "slow", "prose" or None (answer). ``hold_after``: once this many replies are served, hold further requests (answer
    none) until ``release`` is set. Every request is counted by the SHA-256 of its body.
    """

    cases: list[ShapesCase]
    fault: object = None
    slow_seconds: float = 1.5
    hold_after: int | None = None
    max_requests: int = 2000  # a bound on the work one test can ask of it
    seen: dict = field(default_factory=dict)  # body hash -> requests received
    served: dict = field(default_factory=dict)  # body hash -> 200 replies with content
    log: list = field(default_factory=list)  # (kind, instruction, dimension)
    release: threading.Event = field(default_factory=threading.Event)
    auth: str | None = None  # the last request's Authorization header
    admitted: int = 0  # requests let through (not held)

    def __post_init__(self):
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def total_served(self) -> int:
        return sum(self.served.values())

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        self.auth = h.headers.get("Authorization")
        digest = hashlib.sha256(body).hexdigest()
        req = json.loads(body)
        texts = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"] for m in req["messages"]]
        text = "\n".join(texts).lower()
        dim = "prompt_following" if "prompt following" in text else "subject_consistency"
        images = [p["image_url"]["url"] for p in req["messages"][-1]["content"] if p["type"] == "image_url"]
        decoded = [Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) for url in images]
        named = [c for c in self.cases if f'"{c.instruction}"' in "\n".join(texts)]
        inputs = tuple(read(im) for im in decoded[:-1]) if len(named) > 1 else None
        (case,) = [c for c in named if inputs is None or c.inputs == inputs]
        with self.lock:
            n = self.seen[digest] = self.seen.get(digest, 0) + 1
            over = sum(self.seen.values()) > self.max_requests
            hold = self.hold_after is not None and self.admitted >= self.hold_after
            self.admitted += not hold
        if over:
            return self._send(h, 503, "too many requests for one test")
        if hold:
            self.release.wait(timeout=30)
            self.log.append(("held", case.instruction, dim))
            return self._send(h, 503, "held")
        kind = self.fault(n, case.instruction, dim) if self.fault else None
        self.log.append((kind or "ok", case.instruction, dim))
        if kind in ("429", "500", "401"):
            return self._send(h, int(kind), json.dumps({"error": {"message": "try later"}}), {"Retry-After": "0"})
        if kind == "slow":
            time.sleep(self.slow_seconds)
        assert len(images) == len(case.inputs) + 1
        output = decoded[-1]
        if kind in ("malformed", "prose"):
            content = "The image looks fine, I would say 7." if kind == "prose" else '{"score": 11, "reasoning": "x"}'
        elif dim == "prompt_following":
            content = json.dumps({"score": prompt_following(case, output), "reasoning": "read by the Shapes judge"})
        else:
            scores = subject_scores(case, output)
            content = "```json\n" + json.dumps({"score": scores, "reasoning": "per subject"}) + "\n```"
        message = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        reply = {"id": "x", "object": "chat.completion", "model": req["model"], "choices": [choice]}
        if self._send(h, 200, json.dumps(reply)) and kind != "slow":
            with self.lock:
                self.served[digest] = self.served.get(digest, 0) + 1

    @staticmethod
    def _send(h, status: int, text: str, headers: dict | None = None) -> bool:
        data = text.encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
            return True
        except OSError:  # the client gave up (a timeout) and closed the connection
            return False


def expected_report(cases: list[ShapesCase], out: Path, seeds: list[int], skip=()) -> dict:
    """The scores ``omnigen2 eval omnicontext`` must report, computed here from its images by the Shapes judge;
    the cases whose instruction is in ``skip`` are failures (left out)."""
    by_task: dict[str, list] = {}
    per_seed = []
    for seed in seeds:
        rows = {}
        for task in TASK_TYPES:
            mine = [c for c in cases if c.task_type == task and c.instruction not in skip]
            pf, sc, ov = [], [], []
            for c in mine:
                image = out / "images" / task / c.key / f"{seed}.png"
                p, s = prompt_following(c, image), min(subject_scores(c, image))
                pf.append(p), sc.append(s), ov.append((p * s) ** 0.5)
            rows[task] = {"PF": _mean(pf), "SC": _mean(sc), "overall": _mean(ov)}
        rows["average"] = {m: _mean([rows[t][m] for t in TASK_TYPES]) for m in METRICS}
        per_seed.append(rows)
    for row in per_seed[0]:
        by_task[row] = {m: _mean([r[row][m] for r in per_seed]) for m in METRICS}
        if len(seeds) > 1:
            by_task[row] |= {f"{m}_std": float(np.std([r[row][m] for r in per_seed], ddof=1)) for m in METRICS}
    return by_task


def _mean(values: list) -> float | None:
    """None for no values, or when one is None (a task type without a score has no mean, nor has the average)."""
    return None if not values or None in values else float(np.mean(values))
