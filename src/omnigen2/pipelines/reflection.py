"""Reflection protocols: how the chat pipeline asks the MLLM to judge its own image, and how it reads the answer.

A protocol is one small object: the question (:meth:`ReflectionProtocol.question`), the answer's reading
(:meth:`ReflectionProtocol.parse` -> verdict, problem, fix) and, for scored judging, the two verdict texts whose
first differing token the MLLM's confidence is measured at (:meth:`ReflectionProtocol.fork`).

The checkpoint names its protocol in model_index.json (``"omnigen2_reflection"``); the name is looked up among the
protocols installed packages register in the ``omnigen2.reflection`` entry-point group (``omnigen2.loading``), so
a checkpoint picks one of those and never names code to import. Without the key the protocol is :data:`PROMPTED`,
the one for the released weights: it asks in free text and reads the answer leniently. The bundled miniature
names ``"shapes"`` (``omnigen2.shapes.protocol``), the exact sentences its MLLM was trained to answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODEL_INDEX_KEY = "omnigen2_reflection"  # model_index.json: the name of the checkpoint's protocol
VERDICTS = ("match", "mismatch", "unparsed")

# A parsed answer: (verdict, problem, fix); problem and fix are None unless the verdict is "mismatch".
Reading = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class ReflectionProtocol:
    """The question asked about an image, the reading of the answer, and the verdict texts scoring needs.

    ``template``: the question, ``{instruction}`` standing for the instruction the image was drawn from.
    ``parser``: answer -> (verdict in :data:`VERDICTS`, problem, fix); a "mismatch" always comes with a fix (the
    editing instruction the repair is drawn with), else the answer is "unparsed".
    ``verdicts``: (match text, mismatch text) when every answer starts with one of them; the judge's score is
    then the log-odds of the two at the token where they part. None when answers are free text: the score is
    then the greedy verdict's sign (``OmniGen2ChatPipeline.judge_scored``).
    ``max_new_tokens``: how long an answer the judge decodes."""

    name: str
    template: str
    parser: Callable[[str], Reading]
    verdicts: tuple[str, str] | None = None
    max_new_tokens: int = 64

    def question(self, instruction: str) -> str:
        return self.template.format(instruction=instruction)

    def parse(self, answer: str) -> Reading:
        verdict, problem, fix = self.parser(answer)
        if verdict not in VERDICTS:
            raise ValueError(f"reflection protocol {self.name!r} read the verdict {verdict!r}; expected {VERDICTS}")
        return verdict, problem, fix

    def fork(self, tokenizer) -> tuple[list[int], int, int] | None:
        """The tokens both verdict texts start with, and the first token of each after them (match, mismatch);
        None without fixed verdict texts."""
        if self.verdicts is None:
            return None
        match, mismatch = (tokenizer(t, add_special_tokens=False).input_ids for t in self.verdicts)
        n = next((i for i, (a, b) in enumerate(zip(match, mismatch)) if a != b), None)
        if n is None:
            raise ValueError(f"reflection protocol {self.name!r}: one verdict text is a prefix of the other")
        return match[:n], match[n], mismatch[n]


# -- "prompted": the released weights, asked in free text --------------------------------------------------------

PROMPTED_QUESTION = (
    'This image was made for the instruction "{instruction}". Check whether it follows the instruction, and reply '
    "in exactly three lines:\n"
    "Verdict: MATCH if the image follows the instruction, otherwise MISMATCH\n"
    "Reason: what in the image does not follow the instruction (none for a match)\n"
    "Instruction: one editing instruction that would correct the image (none for a match)"
)

# Labels an answer may put before each part; the longest is tried first ("revised instruction" before "instruction").
_LABELS = {
    "verdict": ("verdict", "answer", "judgement", "judgment", "result", "decision", "match"),
    "problem": ("reason", "problem", "explanation", "issue", "issues", "why", "rationale", "justification"),
    "fix": (
        "instruction",
        "revised instruction",
        "editing instruction",
        "edit instruction",
        "edit",
        "fix",
        "correction",
        "revision",
        "revised prompt",
        "suggested edit",
        "repair",
    ),
}
_FIELD_OF = {label: part for part, labels in _LABELS.items() for label in labels}
_LABEL = "|".join(sorted(map(re.escape, _FIELD_OF), key=len, reverse=True))
_LABELLED = re.compile(rf"^({_LABEL})(?:\s*[:=]|\s+[-\u2013\u2014])\s*(.*)$", re.IGNORECASE)
# A label alone on its line, a heading ("## Reason"); not "match", which alone is the verdict itself.
_HEADING = re.compile(rf"^((?!match$)(?:{_LABEL}))$", re.IGNORECASE)
# A reason or fix label after a sentence on the same line ("MISMATCH. Reason: ... Instruction: ...").
_INLINE_LABEL = re.compile(
    rf"(?<=[.;!?|])\s+(?=(?:{'|'.join(map(re.escape, _LABELS['problem'] + _LABELS['fix']))})\s*:)", re.IGNORECASE
)
_LIST_MARKER = re.compile(r"^(?:[-*+>\u2022]+|\d+[.)]|#+)\s*")
_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

_MATCH_WORDS = {"match", "matches", "matched", "matching", "yes", "correct", "true", "pass", "passes", "passed"}
_MISMATCH_WORDS = {"mismatch", "mismatched", "mismatches", "no", "incorrect", "wrong", "false", "fail", "fails"}
_NEGATIONS = {"not", "no", "doesn't", "isn't", "don't", "didn't", "never", "fails", "fail", "mis", "non"}
_NONE = {"", "none", "n/a", "na", "nothing", "null", "-", "no change", "no changes", "not applicable"}


def read_verdict(text: str | None) -> str | None:
    """The verdict, "match" or "mismatch", of a verdict phrase (None: neither): a leading verdict word ("MATCH",
    "Mismatch.", "yes", "No, ..."), else the phrase's first match word, negated or not ("does not match ...")."""
    if not text:
        return None
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    if not words:
        return None
    if words[0] in _MISMATCH_WORDS:
        return "mismatch"
    if words[0] in _MATCH_WORDS:
        return "match"
    for k, w in enumerate(words):
        if w.startswith("mismatch"):
            return "mismatch"
        if w in ("match", "matches", "matched", "matching"):
            return "mismatch" if _NEGATIONS & set(words[max(0, k - 3) : k]) else "match"
    return None


def _value(text) -> str | None:
    """A part's text, or None when the answer left it empty ("none", "n/a", ...)."""
    if text is None or isinstance(text, (dict, list)):
        return None
    text = str(text).strip().strip('"').strip()
    return None if text.lower().rstrip(".") in _NONE else text


def _reading(verdict: str | None, problem, fix) -> Reading:
    if verdict == "match":
        return "match", None, None
    fix = _value(fix)
    if verdict == "mismatch" and fix is not None:
        return "mismatch", _value(problem), fix
    return "unparsed", None, None


def _from_json(text: str) -> Reading | None:
    """A JSON object answer ({"match": false, "reason": ..., "instruction": ...}, fenced or bare), or None."""
    fenced = _FENCED.search(text)
    body = fenced.group(1) if fenced else text[text.find("{") : text.rfind("}") + 1]
    if not body:
        return None
    try:
        data: Any = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    parts: dict[str, Any] = {}
    for key, value in data.items():
        key = re.sub(r"[\s_\-]+", " ", key.strip().lower())
        part = "verdict" if key in ("matches", "is match", "ok") else _FIELD_OF.get(key)
        if part is not None and part not in parts:
            parts[part] = value
    if "verdict" not in parts:
        return None  # some other object: read the answer as text
    verdict = parts["verdict"]
    if isinstance(verdict, bool):
        verdict = "match" if verdict else "mismatch"
    else:
        verdict = read_verdict(None if verdict is None else str(verdict))
    return _reading(verdict, parts.get("problem"), parts.get("fix"))


def _clean(line: str) -> str:
    """One answer line without markdown: emphasis, code ticks, headings, list and quote markers."""
    line = line.replace("**", "").replace("__", "").replace("`", "").strip()
    return _LIST_MARKER.sub("", line).strip().strip("*_").strip()


def _is_label(line: str) -> bool:
    return bool(_LABELLED.match(line) or _HEADING.match(line))


def parse_prompted(answer: str) -> Reading:
    """Read a free-text judgement: a JSON object if the answer holds one, else labelled lines ("Verdict:",
    "Reason:", "Instruction:", with markdown, list markers and any letter case), the verdict on the first line
    when unlabelled, and the reason and instruction by position when an answer of three lines drops the labels.
    A mismatch without an instruction to repair it is "unparsed"."""
    text = (answer or "").strip()
    if "{" in text:
        reading = _from_json(text)
        if reading is not None:
            return reading
    lines = [_clean(x) for x in _INLINE_LABEL.sub("\n", text).splitlines()]
    lines = [x for x in lines if x]
    if not lines:
        return "unparsed", None, None
    parts: dict[str, str] = {}
    plain: list[int] = []  # indices of the unlabelled lines
    taken: set[int] = set()  # labels whose value is the next line
    for k, line in enumerate(lines):
        m = _LABELLED.match(line) or _HEADING.match(line)
        if m is None:
            if k - 1 not in taken:
                plain.append(k)
            continue
        part, value = _FIELD_OF[m.group(1).lower()], ("" if m.re is _HEADING else _clean(m.group(2)))
        if not value and k + 1 < len(lines) and not _is_label(lines[k + 1]):
            value = lines[k + 1]  # "Instruction:" with the instruction on the next line
            taken.add(k)
        parts.setdefault(part, value)
    head = parts.get("verdict", lines[0] if plain[:1] == [0] else None)
    verdict = read_verdict(head)
    if verdict == "mismatch" and "fix" not in parts and len(lines) == 3 and plain[-1:] == [2]:
        # verdict, reason, instruction in the order asked, the labels dropped
        parts["fix"] = lines[2]
        if 1 in plain:
            parts.setdefault("problem", lines[1])
    if verdict == "mismatch" and "problem" not in parts and head:
        # the reason on the verdict's line: "MISMATCH: the car is blue", "No, the car is blue.", "It does not
        # match: the car is blue"
        lead = re.match(r"\W*([\w']+)\W*(.*)$", head, re.DOTALL)
        if lead and lead.group(1).lower() in _MISMATCH_WORDS:
            parts["problem"] = lead.group(2)
        elif ":" in head:
            parts["problem"] = head.split(":", 1)[1]
    return _reading(verdict, parts.get("problem"), parts.get("fix"))


PROMPTED = ReflectionProtocol(
    name="prompted",
    template=PROMPTED_QUESTION,
    parser=parse_prompted,
    verdicts=None,  # free text: no fixed verdict sentences to score, the greedy verdict stands
    max_new_tokens=160,
)
DEFAULT_PROTOCOL = PROMPTED  # the checkpoint names none: the released weights


def resolve_protocol(choice: str | ReflectionProtocol | None, model_index_extra: dict | None = None):
    """The protocol a chat pipeline judges with: ``choice`` (a protocol, or a registered name), else the one the
    checkpoint names in model_index.json, else :data:`PROMPTED`. A name is looked up in the ``omnigen2.reflection``
    entry points (``omnigen2.loading.resolve_named``); an unknown one is a ValueError listing the known ones."""
    if isinstance(choice, ReflectionProtocol):
        return choice
    name = choice if choice is not None else (model_index_extra or {}).get(MODEL_INDEX_KEY)
    if name is None:
        return DEFAULT_PROTOCOL
    from ..loading import resolve_named

    protocol = resolve_named(MODEL_INDEX_KEY, name)
    if not isinstance(protocol, ReflectionProtocol):
        raise TypeError(f"{MODEL_INDEX_KEY} {name!r} is registered as a {type(protocol).__name__}, not a protocol")
    return protocol


__all__ = [
    "DEFAULT_PROTOCOL",
    "MODEL_INDEX_KEY",
    "PROMPTED",
    "PROMPTED_QUESTION",
    "ReflectionProtocol",
    "parse_prompted",
    "read_verdict",
    "resolve_protocol",
]
