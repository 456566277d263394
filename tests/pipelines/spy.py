"""A stand-in for the generation pipeline that records what the chat pipeline asks of it."""


class Spy:
    """Records the generation pipeline's calls and runs them."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)
