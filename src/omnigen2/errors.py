"""The errors omnigen2 raises for bad input.

Each names what is wrong (the file, field, tensor or argument, and the value). All derive from ``OmniGen2Error``
and from ``ValueError``, so callers may catch either; the CLI turns them into one line and exit code 2.
"""

from __future__ import annotations


class OmniGen2Error(ValueError):
    """Base class: bad input that omnigen2 refused before it could do harm."""


class CheckpointError(OmniGen2Error):
    """A pipeline directory, weights file, config or adapter is missing something, is corrupt, or names
    something this loader does not load."""


class DataError(OmniGen2Error):
    """Training data or batch records that cannot be used."""


class ImageError(OmniGen2Error):
    """An input image could not be used; the message names the image and the problem."""


class LimitError(OmniGen2Error):
    """A request beyond a resource bound (steps, images, pixels, tokens, inputs); the message names the bound and
    the flag or argument that raises it."""
