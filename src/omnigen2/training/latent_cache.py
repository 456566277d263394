"""VAE posteriors of training images, kept in memory and, with ``data.latent_cache_file``, in a safetensors file.

The VAE is frozen, so an image's posterior (mean, std) is the same at every step and in every run that uses the
same VAE and resize rule. On a small transformer the encoder costs a large share of a step: on the Shapes
miniature (2.8M parameters, 64x64 images, one CPU thread) about 0.2 s of a 0.85 s step while the data is still
fresh. Runs that revisit the same images (the warm-restart phases of a recipe, a resumed run, a second process
on the same data) read them from the file instead of encoding them again; ``omnigen2 train CONFIG
--encode-latents`` fills it for the whole mix before a run.

File layout: blocks of posteriors of one latent shape, ``mean.I`` and ``std.I`` of shape (N, C, h, w), and in the
metadata ``keys.I`` (a JSON list of the N entries' keys: image file, max_pixels, max_side_length) and ``vae`` (a
fingerprint of the VAE's weights and config). A file written with another VAE is refused, never silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import DataError

logger = logging.getLogger(__name__)

COMPACT_EVERY = 2048  # entries put between two compactions

Key = tuple[str, int, "int | None"]  # ImageSpec.cache_key: (image file, max_pixels, max_side_length)


def vae_fingerprint(vae) -> str:
    """sha256 over the VAE's config and every weight's name, shape and values (fp32, CPU). Private config
    entries (``_name_or_path``, ``_diffusers_version``) say where it was read from, not what it computes."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """key -> (mean, std), each (C, h, w) float32 on the CPU, stored in blocks of stacked entries."""

    def __init__(self, vae):
        self.vae = vae
        self._fingerprint: str | None = None
        self.entries: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        # (keys, means (N, C, h, w), stds): the entries of one file tensor or one compaction, written as they are
        self.blocks: list[tuple[list[Key], torch.Tensor, torch.Tensor]] = []
        self.loaded = 0  # entries read from the file; the rest were encoded in this run
        self._loose: list[Key] = []  # entries put since the last compact()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = vae_fingerprint(self.vae)
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def get(self, key: Key) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.entries.get(key)

    def put(self, key: Key, mean: torch.Tensor, std: torch.Tensor) -> None:
        if key in self.entries:
            return
        self.entries[key] = (mean, std)
        self._loose.append(key)
        if len(self._loose) >= COMPACT_EVERY:
            self.compact()

    def compact(self) -> None:
        """Move the entries put since the last call into one block per shape. Kept one by one, the small
        tensors, allocated between the encoder's temporaries, cost about three times their size."""
        groups: dict[tuple, list[Key]] = {}
        for key in self._loose:
            groups.setdefault(tuple(self.entries[key][0].shape), []).append(key)
        for keys in groups.values():
            means = torch.stack([self.entries[k][0] for k in keys])  # (N, C, h, w)
            stds = torch.stack([self.entries[k][1] for k in keys])
            self._add_block(keys, means, stds)
        self._loose = []

    def _add_block(self, keys: list[Key], means: torch.Tensor, stds: torch.Tensor) -> None:
        self.blocks.append((keys, means, stds))
        for i, k in enumerate(keys):
            self.entries[k] = (means[i], stds[i])

    def load(self, path: str | Path) -> int:
        """Add the entries of ``path`` (a missing file adds none); returns how many were read."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return 0
        try:
            return self._read(path, safe_open)
        except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataError(
                f"data.latent_cache_file {str(path)!r} is corrupt or incomplete ({type(e).__name__}: {e}); delete it "
                "(the run encodes the images again and rewrites it)"
            ) from e

    def _read(self, path: Path, safe_open) -> int:
        n = 0
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("vae") != self.fingerprint:
                raise ValueError(
                    f"{path}: latent cache written with another VAE (fingerprint {meta.get('vae', 'missing')!r}, "
                    f"this run's VAE {self.fingerprint!r}); delete it or point data.latent_cache_file elsewhere"
                )
            for name in f.keys():
                if not name.startswith("mean."):
                    continue
                block = name[len("mean.") :]
                keys = [tuple(k) for k in json.loads(meta[f"keys.{block}"])]
                means, stds = f.get_tensor(name), f.get_tensor(f"std.{block}")  # (N, C, h, w) each
                if len(keys) != means.shape[0] or stds.shape != means.shape:
                    raise ValueError(f"{path}: block {block}: {len(keys)} keys for means {tuple(means.shape)}")
                new = [i for i, k in enumerate(keys) if k not in self.entries]
                if len(new) < len(keys):  # already known (put or read before): keep the first
                    keys, means, stds = [keys[i] for i in new], means[new], stds[new]
                if keys:
                    self._add_block(keys, means, stds)
                n += len(keys)
        self.loaded += n
        return n

    def save(self, path: str | Path) -> None:
        """Write every entry to ``path`` (through a temporary file and a rename, so a reader never sees half)."""
        from safetensors.torch import save_file

        self.compact()
        path = Path(path)
        tensors, meta = {}, {"vae": self.fingerprint}
        for i, (keys, means, stds) in enumerate(self.blocks):
            tensors[f"mean.{i}"], tensors[f"std.{i}"] = means, stds
            meta[f"keys.{i}"] = json.dumps([list(k) for k in keys])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves the previous file, and no temporary
        logger.info("latent cache: %d posteriors in %d blocks written to %s", len(self.entries), len(self.blocks), path)
