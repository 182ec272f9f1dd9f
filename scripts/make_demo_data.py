"""Make a small, learnable ImageFolder dataset so everything runs with no download.

Each class is a shape (disc, square, triangle, stripes, ring, cross, ...) drawn
in a class-typical hue at a random position, size and rotation on a noisy
background, saved as JPEG in ImageNet's layout (``train/CLASS/*.JPEG``,
``val/CLASS/*.JPEG``). A small network learns it well above chance in a few
CPU epochs; the same seed always gives the same bytes.

    python scripts/make_demo_data.py data/demo
"""
import colorsys
import math
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.config import ArgumentParser, require_at_least  # noqa: E402
from engine.errors import UsageError, run_cli  # noqa: E402

Point = Tuple[float, float]
SHAPES = ("disc", "square", "triangle", "stripes", "ring", "cross", "diamond", "bars")


def _rotate(points: Sequence[Point], centre: Point, angle: float) -> List[Point]:
    cx, cy = centre
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: Point, radius: float, angle: float, colour) -> None:
    cx, cy = centre
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    elif shape in ("square", "diamond"):
        turn = angle + (math.pi / 4 if shape == "diamond" else 0.0)
        corners = [(cx - radius, cy - radius), (cx + radius, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
        draw.polygon(_rotate(corners, centre, turn), fill=colour)
    elif shape == "triangle":
        corners = [(cx + radius * math.cos(angle + k * 2 * math.pi / 3), cy + radius * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
        draw.polygon(corners, fill=colour)
    elif shape == "cross":
        arm = radius / 3
        for corners in (
            [(cx - radius, cy - arm), (cx + radius, cy - arm), (cx + radius, cy + arm), (cx - radius, cy + arm)],
            [(cx - arm, cy - radius), (cx + arm, cy - radius), (cx + arm, cy + radius), (cx - arm, cy + radius)],
        ):
            draw.polygon(_rotate(corners, centre, angle), fill=colour)
    else:  # stripes and bars: parallel bands, thin or thick
        width = max(2, int(radius / (4 if shape == "stripes" else 2)))
        for offset in range(-int(2 * radius), int(2 * radius), 2 * width):
            ends = [(cx + offset, cy - 2 * radius), (cx + offset, cy + 2 * radius)]
            draw.line(_rotate(ends, centre, angle), fill=colour, width=width)


def make_image(shape: str, hue: float, rng: random.Random, size: Tuple[int, int]) -> Image.Image:
    width, height = size
    background = tuple(rng.randint(40, 215) for _ in range(3))
    image = Image.effect_noise(size, rng.uniform(10, 40)).convert("RGB")
    image = Image.blend(Image.new("RGB", size, background), image, 0.35)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.2, 0.35) * min(size)
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    r, g, b = colorsys.hsv_to_rgb((hue + rng.uniform(-0.06, 0.06)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    _draw_shape(draw, shape, centre, radius, rng.uniform(0, math.pi), (int(r * 255), int(g * 255), int(b * 255)))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def make_demo_dataset(
    root: str,
    num_classes: int = 4,
    train_per_class: int = 48,
    val_per_class: int = 16,
    size: Tuple[int, int] = (80, 60),
    seed: int = 0,
) -> Dict[str, int]:
    """Write the dataset under ``root`` and return the number of images per split."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    counts = {"train": 0, "val": 0}
    for index, shape in enumerate(SHAPES[:num_classes]):
        class_name = f"n{index:08d}_{shape}"
        hue = index / num_classes
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(root, split, class_name)
            os.makedirs(folder, exist_ok=True)
            rng = random.Random(f"{seed}-{split}-{index}")
            for item in range(per_class):
                path = os.path.join(folder, f"{split}_{index}_{item:05d}.JPEG")
                make_image(shape, hue, rng, size).save(path, quality=90)
                counts[split] += 1
    return counts


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to create (train/ and val/ go inside)")
    parser.add_argument("--classes", type=int, default=4, help="number of classes, 2 to %d (default 4)" % len(SHAPES))
    parser.add_argument("--train-per-class", type=int, default=48, help="training images per class (default 48)")
    parser.add_argument("--val-per-class", type=int, default=16, help="validation images per class (default 16)")
    parser.add_argument("--width", type=int, default=80, help="image width in pixels (default 80)")
    parser.add_argument("--height", type=int, default=60, help="image height in pixels (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shapes, colours and positions (default 0)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 2 <= args.classes <= len(SHAPES):
        raise UsageError(f"--classes must be between 2 and {len(SHAPES)} (one shape per class), got {args.classes}")
    require_at_least(args, 1, "train_per_class", "val_per_class")
    # The smallest crop the training scripts take is 8 pixels.
    require_at_least(args, 8, "width", "height")
    try:
        counts = make_demo_dataset(
            args.root, args.classes, args.train_per_class, args.val_per_class, (args.width, args.height), args.seed
        )
    except OSError as error:
        raise UsageError(f"cannot write the dataset under {args.root!r}: {error.strerror or error}") from None
    print(f"wrote {counts['train']} train and {counts['val']} val images in {args.classes} classes to {args.root}")
    return 0


if __name__ == "__main__":
    run_cli(main)
