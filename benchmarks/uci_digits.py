"""A second small real set for the quality benchmark: the UCI handwritten digits scikit-learn ships.

    uv run python benchmarks/uci_digits.py data/uci-digits [--size 32] [--split 134,20,20] [--seed 0]

scikit-learn (installed with the bench dependency group, through mlxtend) carries the 1,797 8x8
digits of the UCI "Optical Recognition of Handwritten Digits" set (16 grey levels, 174-183 a
class) in its wheel: no network. They are written like `sar mnist`'s folder (pipelines/data/mnist.py):
OUT/{train,val,test}/digit<k>/, 134 / 20 / 20 a class by default (the smallest class has 174), each 8x8 image scaled to 32x32
with bilinear interpolation (0-16 -> 0-255). Settings chosen on MNIST are checked here: another
writer, another resolution of the strokes, a third of MNIST's training images
(docs/benchmarks.md, Quality).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.data.mnist import write_digit_folder  # noqa: E402


def uci_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, size, size) uint8, labels (1797,)) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)
    scaled = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey])
    return scaled, np.asarray(d.target, np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--split", default="134,20,20", help="train,val,test images per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    images, labels = uci_digits(args.size)
    s = write_digit_folder(args.out, images, labels, tuple(int(n) for n in args.split.split(",")), args.seed,
                           what="uci-digits")
    print(f"wrote {', '.join(f'{n} {split}' for split, n in s.counts.items())} images of 10 digits to {s.root}")


if __name__ == "__main__":
    main()
