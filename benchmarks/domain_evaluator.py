"""The domain evaluator on the synthetic dataset: held-out accuracy, and its metrics' floor and ceiling.

    OMP_NUM_THREADS=1 uv run python benchmarks/domain_evaluator.py [--classes 10] [--per-class 32]
        [--size 48] [--epochs 20] [--batch 32] [--holdout 0.2] [--seed 0] [--out FILE.json]

Makes `pipelines.data.synth.make_synthetic_imagenet(classes, per_class, size, seed, val_per_class=2)`
in a temporary folder, trains the evaluator (pipelines.evaluate.domain_training.train_evaluator) on its train
split on the CPU, then scores, with torch-fidelity through the "sar-domain" extractor, one half
of the held-out real images (each class's held-out images alternate between two halves)
against the other half, and other sets against that same half:

  floor      real held-out half A vs real held-out half B (the best a generator can do here)
  shuffled   half A with every label moved to the next class (accuracy should fall to ~0)
  blurred    half A, Gaussian blur radius 2 px
  inverted   half A, colours inverted (255 - x)
  noise      uniform random uint8 images, as many as half A (the ceiling)

FID, KID and precision/recall on a few dozen images carry small-sample bias: compare sets of
the same size only. With k = 3 nearest neighbours and only ~3 held-out images per class per
half, a real image's k-NN ball reaches into other classes, so precision says little at the
default size; raise --per-class to see it separate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from pipelines.data.synth import make_synthetic_imagenet  # noqa: E402
from pipelines.evaluate import domain, domain_training  # noqa: E402


def blurred(images: np.ndarray, radius: float) -> np.ndarray:
    """(N, H, W, 3) uint8, each Gaussian-blurred."""
    return np.stack([np.array(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius))) for x in images])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the results here as JSON")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="sar-domain-bench-") as tmp:
        root, path = os.path.join(tmp, "imagenet"), os.path.join(tmp, "evaluator.pt")
        make_synthetic_imagenet(root, classes=args.classes, per_class=args.per_class, size=args.size,
                                seed=args.seed, val_per_class=2)
        info = domain_training.train_evaluator(root, image_size=args.size, out_url=path, epochs=args.epochs,
                                         batch_size=args.batch, holdout_fraction=args.holdout, seed=args.seed)
        print(f"trained on {info.num_train} images, held out {info.num_heldout}: held-out accuracy "
              f"{info.heldout_accuracy:.3f}, train accuracy {info.train_accuracy:.3f}, {info.seconds:.1f} s "
              f"(torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")

        held = domain.reference_images(path, root)
        a, b = held.halves()
        sets = {
            "floor": (a, a.labels),
            "shuffled": (a, (a.labels + 1) % args.classes),
            "blurred": (domain.LabelledImages(blurred(a.images, 2.0), a.labels), a.labels),
            "inverted": (domain.LabelledImages(255 - a.images, a.labels), a.labels),
            "noise": (domain.noise_images(len(a), args.size, seed=args.seed + 1), a.labels),
        }
        results = {}
        print(f"\n{'set':<9} {'n':>4} {'FID':>9} {'KID':>9} {'prec':>6} {'recall':>6} {'acc':>6}   vs half B "
              f"({len(b)} real held-out images)")
        for name, (images, labels) in sets.items():
            start = time.time()
            r = domain.evaluate_samples(images, labels, b, path, batch_size=64, cuda=False)
            r["seconds"] = round(time.time() - start, 2)
            results[name] = r
            kid = r["kid"]["mean"] if r["kid"] else float("nan")
            print(f"{name:<9} {r['num_samples']:>4} {r['fid']:>9.3f} {kid:>9.4f} {r['precision']:>6.3f} "
                  f"{r['recall']:>6.3f} {r['accuracy']:>6.3f}")

    summary = {"args": vars(args), "heldout_accuracy": info.heldout_accuracy, "train_accuracy": info.train_accuracy,
               "train_seconds": round(info.seconds, 1), "num_train": info.num_train,
               "num_heldout": info.num_heldout, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
    main()
