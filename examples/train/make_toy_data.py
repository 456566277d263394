"""Write a small dataset in the original OmniGen2 format (t2i, edit and in-context records + a yml mix).

    python examples/train/make_toy_data.py examples/train/toy

Images are flat colored shapes; enough to try the trainer end to end (the Shapes World of issue 4 is the
real synthetic benchmark).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square")


def draw(color: str, shape: str, size: int = 128, offset: int = 0) -> Image.Image:
    im = Image.new("RGB", (size, size), "white")
    box = [size // 4 + offset, size // 4, 3 * size // 4 + offset, 3 * size // 4]
    (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLORS[color])
    return im


def main(out: Path, n: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    for task in ("t2i", "edit", "ic"):
        (out / task / "images").mkdir(parents=True, exist_ok=True)
    t2i, edit, ic = [], [], []
    for i in range(n):
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        draw(c, s).save(out / "t2i" / "images" / f"{i}.png")
        t2i.append(
            {"task_type": "t2i", "instruction": f"The image shows a {c} {s}.", "output_image": f"images/{i}.png"}
        )
        c2 = rng.choice([x for x in COLORS if x != c])
        draw(c, s).save(out / "edit" / "images" / f"{i}_in.png")
        draw(c2, s).save(out / "edit" / "images" / f"{i}_out.png")
        edit.append(
            {
                "task_type": "edit",
                "instruction": f"Make the {s} {c2}.",
                "input_images": [f"images/{i}_in.png"],
                "output_image": f"images/{i}_out.png",
            }
        )
        draw(c, s).save(out / "ic" / "images" / f"{i}_a.png")
        draw(c, s, offset=-16).save(out / "ic" / "images" / f"{i}_out.png")
        ic.append(
            {
                "task_type": "ic",
                "instruction": f"Move the {s} from image 1 to the left.",
                "input_images": [f"images/{i}_a.png"],
                "output_image": f"images/{i}_out.png",
            }
        )
    for task, recs in (("t2i", t2i), ("edit", edit), ("ic", ic)):
        (out / task / "records.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (out / "mix.yml").write_text(
        "data:\n  - {path: t2i/records.jsonl, ratio: 2}\n  - {path: edit/records.jsonl, ratio: 1}\n"
        "  - {path: ic, ratio: 1}\n"
    )
    print(f"wrote {3 * n} records and {out / 'mix.yml'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/train/toy"))
