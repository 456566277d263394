"""An auxiliary loss that makes the MLLM's vision tokens keep each cell's dot, for the answering adapter.

Why. The miniature's vision tower drops the dot's colour: a linear probe reads it from the raw 16 x 16 pixels of a
corner cell at 0.87 but from the merged vision token of that cell at 0.32 (chance is about 0.3), so the answering
adapter never says "with a ... dot" in a caption, and 37 of its 46 failed captions (of 75) were right but for their
dots (docs/notes/adapter.md, "The dot the vision tower drops"). The tower was trained through a language model that
could not read dots either, so nothing asked it to keep them; training on dot-rich captions alone moved the
caption's dot guesses (P(" with") 0.69 on dotted objects, 0.31 on plain ones) but not the colour.

How. While the adapter trains, a linear head over each image's merged vision tokens predicts, for each of the 9
cells, whether its object has a dot and of which colour; its cross-entropy is added to the answers' loss with a
weight. The labels come from the images themselves through the judge (:func:`judge.read`, exact on rendered
scenes), so any pool of examples can carry the loss: images the judge cannot read, or of another size, carry none.
The head is dropped after training; only the adapter (whose LoRA layers include the tower) keeps what it taught.

Counting. The tower does keep each cell's shape (a linear probe over an image's 16 tokens reads it at 0.994 and the
per-shape counts it implies at 0.97), yet the adapter answered "how many ...?" at 0.72-0.77, most misses one off.
A question's last token can only count by attending to the image's tokens, and an object covers one to four of
them depending on its cell, so the share of "circle" tokens is not the number of circles. With ``count_weight``
the probe also asks for counts an attention head can take: one linear map shared by every token, summed over the
image's tokens, regressed on the judge's per-shape counts (docs/notes/adapter.md, "Counting").
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from . import judge
from .world import CELLS, COLORS, SHAPES

NO_DOT = 0  # class of a cell whose object has no dot; a dot of colour c is 1 + its index in the palette
DOT_CLASS = {color: 1 + k for k, color in enumerate(COLORS)}
CLASSES = 1 + len(COLORS)
IGNORE = -100  # an empty cell, or an image the judge cannot read
TOKENS = 16  # merged vision tokens of one 64 x 64 image (8-pixel patches merged 2 x 2)
NO_COUNT = -1  # the per-shape counts of an image the judge cannot read


def cell_labels(image) -> list[int]:
    """Per cell (reading order): the dot class of its object, or IGNORE for an empty cell; all IGNORE when the
    judge cannot read the image."""
    return _dots(judge.read(image))


def probe_labels(image) -> list[int]:
    """What the probe learns of one image: :func:`cell_labels` (9), then the number of objects of each shape in
    ``SHAPES`` order (4), or NO_COUNT each when the judge cannot read it."""
    scene = judge.read(image)
    counts = [NO_COUNT] * len(SHAPES) if isinstance(scene, judge.Failure) else [scene.count(s) for s in SHAPES]
    return _dots(scene) + counts


def _dots(scene) -> list[int]:
    labels = [IGNORE] * len(CELLS)
    if isinstance(scene, judge.Failure):
        return labels
    for obj in scene.objects:
        labels[CELLS.index(obj.cell)] = NO_DOT if obj.dot is None else DOT_CLASS[obj.dot]
    return labels


class CellProbe(nn.Module):
    """Wraps an MLLM for training: ``forward(**batch, cell_labels=(N_images, 9 or 13))`` returns the MLLM's answer
    loss plus ``weight`` times the probe's cross-entropy over the cells of the 64 x 64 images of the batch and, with
    ``count_weight > 0`` (the labels then :func:`probe_labels`, 13 per image; without it their counts are not
    read), that weight times the mean squared error of the additive per-shape counts.

    The vision tower's output (all images' merged tokens, (T, D), in batch order) is caught by a forward hook, so
    the MLLM's own forward runs unchanged."""

    def __init__(self, mllm, weight: float, count_weight: float = 0.0):
        super().__init__()
        self.mllm, self.weight, self.count_weight = mllm, weight, count_weight
        visual = mllm.model.visual
        dim = visual.merger.mlp[-1].out_features
        self.head = nn.Linear(TOKENS * dim, len(CELLS) * CLASSES)
        # Shared by every token and summed over them: a count that attention over the tokens can take.
        self.count_head = nn.Linear(dim, len(SHAPES)) if count_weight > 0 else None
        self._tokens: torch.Tensor | None = None
        self._hook = visual.register_forward_hook(self._catch)

    def _catch(self, module, inputs, output) -> None:
        # transformers returns the merged tokens as a tensor or in an output object (pooler_output).
        self._tokens = getattr(output, "pooler_output", output)

    def remove(self) -> None:
        self._hook.remove()

    def forward(self, cell_labels: torch.Tensor, **batch):
        self._tokens = None
        out = self.mllm(**batch)
        if self._tokens is None or not len(cell_labels):
            return out
        counts = batch["image_grid_thw"].prod(-1) // self.mllm.config.vision_config.spatial_merge_size**2
        per_image = self._tokens.split(counts.tolist())  # N_images x (tokens_i, D)
        keep = [i for i, t in enumerate(per_image) if t.shape[0] == TOKENS]
        if not keep:
            return out
        tokens = torch.stack([per_image[i] for i in keep])  # (n, 16, D)
        dots, shape_counts = cell_labels[keep, : len(CELLS)], cell_labels[keep, len(CELLS) :]  # (n, 9), (n, 4|0)
        cell_loss = count_loss = None
        if self.weight > 0 and (dots != IGNORE).any():
            logits = self.head(tokens.flatten(1)).reshape(-1, CLASSES)  # (n * 9, CLASSES)
            cell_loss = nn.functional.cross_entropy(logits, dots.reshape(-1), ignore_index=IGNORE)
        if self.count_head is not None:
            read = (shape_counts != NO_COUNT).all(-1)  # (n,)
            if read.any():
                predicted = self.count_head(tokens[read]).sum(1)  # (n_read, 4): summed over the 16 tokens
                count_loss = nn.functional.mse_loss(predicted, shape_counts[read].float())
        if cell_loss is None and count_loss is None:
            return out
        cell_loss = out.loss.new_zeros(()) if cell_loss is None else cell_loss
        count_loss = out.loss.new_zeros(()) if count_loss is None else count_loss
        loss = out.loss + self.weight * cell_loss + self.count_weight * count_loss
        return SimpleNamespace(loss=loss, answer_loss=out.loss, cell_loss=cell_loss, count_loss=count_loss)
