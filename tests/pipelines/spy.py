"""Test doubles of the chat tests: a stand-in for the generation pipeline that records what the chat pipeline
asks of it, and a logits processor that scripts the MLLM's answer."""

import torch


class Spy:
    """Records the generation pipeline's calls and runs them."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def script(tokens: list[int]):
    """A logits processor that makes decode step k emit tokens[k] (the states still come from the decode)."""

    def force(step, answer, logits):
        forced = torch.full_like(logits, -torch.inf)
        forced[0, tokens[step]] = 0.0
        return forced

    return force
