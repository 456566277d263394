"""How much a transformer's prediction relies on its prompt: the x1-estimate error with the right prompt against
the error with another case's prompt, on text-to-image training cases, at a few noise levels.

A model that ignores its text has the same error either way (every prompt draws the same picture); one that
follows it is much closer with the right prompt near pure noise, where the prompt decides the picture. This is
the diagnostic that found the miniature's time-shift and curriculum problems (docs/notes/transformer.md, "The cause:
time sampling" and "Text-to-image first")::

    python experiments/text_reliance.py PIPELINE_DIR [--n 24]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

TIMES = (0.02, 0.05, 0.1, 0.2, 0.4)  # t = 0 is pure noise (x_t = t x1 + (1 - t) x0)


@torch.no_grad()
def text_reliance(pipe, n: int = 24, times=TIMES, seed: int = 0) -> dict[float, dict[str, float]]:
    """t -> {"right": MSE of the x1 estimate with each case's prompt, "swapped": with the next case's prompt}, in
    scaled latent units, over ``n`` text-to-image training cases (not ShapesBench's held-out seeds)."""
    from omnigen2.shapes.tasks import cases

    if n < 2:
        raise ValueError(f"n must be at least 2 to swap prompts, got {n}")
    device = pipe.transformer.device
    cl = cases("t2i", n, split="train", start=123)
    pixels = [torch.from_numpy(np.array(c.render_target())).permute(2, 0, 1) for c in cl]  # (3, H, W) uint8
    x = torch.stack(pixels).float().div(127.5).sub(1).to(device=device, dtype=pipe.vae.dtype)  # (n, 3, H, W)
    z = pipe._scale_latents(pipe.vae.encode(x).latent_dist.mode()).float()  # (n, C, h, w)
    emb, mask = pipe.encode_text([c.prompt for c in cl], 256, device)  # (n, L, D), (n, L)
    x0 = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    out = {}
    for t in times:
        xt = t * z + (1 - t) * x0
        tt = torch.full((n,), t, device=device)
        row = {}
        for name, shift in (("right", 0), ("swapped", 1)):
            v = pipe.transformer(list(xt), tt, emb.roll(shift, 0), None, mask.roll(shift, 0), None)
            v = torch.stack(list(v)) if isinstance(v, list | tuple) else v  # (n, C, h, w) velocity x1 - x0
            row[name] = float(((xt + (1 - t) * v.float() - z) ** 2).mean())
        out[t] = row
    return out


def main(argv=None) -> int:
    from omnigen2.pipelines import OmniGen2Pipeline

    p = argparse.ArgumentParser(prog="python experiments/text_reliance.py", description=__doc__.split("\n")[0])
    p.add_argument("model", help="pipeline directory, hub id or builtin:NAME (a Shapes World model)")
    p.add_argument("--n", type=int, default=24)
    args = p.parse_args(argv)
    pipe = OmniGen2Pipeline.from_pretrained(args.model)
    result = text_reliance(pipe, args.n)
    for t, row in result.items():
        print(f"t = {t:<5} right prompt {row['right']:.4f}   swapped prompt {row['swapped']:.4f}")
    print(json.dumps({str(t): row for t, row in result.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
