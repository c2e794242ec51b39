"""Training the domain evaluator: a small classifier of a dataset's own real images (the network is
models/domain_classifier.py), saved as an evaluator file that pipelines/evaluate/domain.py reads.

Reads   an ImageNet-layout split (local or s3://, pipelines/data/imagenet.py), decoded with ADM's
        centre crop (pipelines/data/preprocess.py).
Writes  one evaluator file (torch.save, written atomically through pipelines/core/storage.py);
        domain.py describes its content.

A per-class share of the images is held out and recorded in the file, so the "floor" (real
held-out images against real images) is measured on images the evaluator never trained on.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.domain_classifier import DomainClassifier, to_input
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data.imagenet import list_imagenet
from pipelines.evaluate.domain import FORMAT, VERSION, decode_keys, read_metadata

log = logging.getLogger(__name__)


def split_per_class(labels: np.ndarray, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): round(fraction * n) of each class held out, at least 1 when n >= 2."""
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for label in np.unique(labels):  # label order, so the draw is a function of (labels, fraction, seed)
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        n_hold = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(holdout_fraction * len(idx))))
        heldout += idx[:n_hold].tolist()
        train += idx[n_hold:].tolist()
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(heldout, np.int64))



# Training --------------------------------------------------------------------------------------
@dataclass
class EvaluatorInfo:
    """What train_evaluator made: where, on what, and how well it classifies held-out images."""

    url: str
    wnids: list[str]
    image_size: int
    feature_dim: int
    num_train: int
    num_heldout: int
    heldout_accuracy: float
    train_accuracy: float
    seconds: float
    rejected: dict[str, str] = field(default_factory=dict)


def augment(x: torch.Tensor, gen: torch.Generator, shift: int, jitter: float, hflip: bool) -> torch.Tensor:
    """Random shift (reflect-pad + crop), small brightness/contrast jitter, optional flip of (B, 3, S, S)."""
    b, _, s, _ = x.shape
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])
    if jitter > 0:
        # Brightness and contrast only: hue is what tells many classes apart, so it is never jittered.
        gain, contrast = (1 + jitter * (2 * torch.rand(2, b, 1, 1, 1, generator=gen) - 1)).to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean + 1) * gain - 1
        x = x.clamp(-1, 1)
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


@torch.no_grad()
def predict(net: DomainClassifier, images: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted labels (N,) of (N, S, S, 3) uint8 images."""
    net.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2)
        out.append(net(to_input(x, images.shape[1]))[1].argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def train_evaluator(source: str, *, split: str = "train", image_size: int, out_url: str,
                    classes: int | None = None, per_class: int | None = None, holdout_fraction: float = 0.2,
                    epochs: int, batch_size: int, seed: int = 0, lr: float = 3e-3, weight_decay: float = 0.05,
                    widths: Sequence[int] = (32, 64, 128, 128), blocks: int = 1, groups: int = 8,
                    hflip: bool = False, shift: int | None = None, jitter: float = 0.1,
                    device: str | torch.device = "cpu",
                    storage_options: dict[str, Any] | None = None) -> EvaluatorInfo:
    """Train the evaluator on `split` of an ImageNet-layout `source` and save it to `out_url`.

    All images of the subset are decoded once into memory (meant for evaluator-sized subsets:
    100 classes x 100 images at 64 px is 120 MB). Flip is off by default: not every dataset is
    flip-invariant, and an evaluator blind to flips cannot see a generator that mirrors.
    """
    if image_size < 2 ** len(widths):
        raise SarError(f"evaluator image_size: {image_size} is too small for {len(widths)} stages "
                       f"(at least {2 ** len(widths)} px)")
    if not 0 < holdout_fraction < 1:
        raise SarError(f"evaluator holdout_fraction: {holdout_fraction} is not in (0, 1)")
    if epochs < 1 or batch_size < 1:
        raise SarError(f"evaluator epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    start_time = time.time()
    device = torch.device(device)
    shift = max(1, image_size // 8) if shift is None else shift

    # Data: list, decode (ADM crop), split per class.
    listing = list_imagenet(source, split, classes, per_class, storage_options)
    keys, labels = [k for k, _ in listing.items], [lbl for _, lbl in listing.items]
    images, labels, keys, rejected = decode_keys(source, keys, labels, image_size, storage_options)
    if rejected:  # reported and skipped, as the encoder does; recorded in the file's meta
        key, reason = next(iter(rejected.items()))
        log.warning("evaluator: skipping %d unreadable files (first: %s: %s)", len(rejected), key, reason)
    train_idx, held_idx = split_per_class(labels, holdout_fraction, seed)
    if len(held_idx) == 0:
        raise SarError(f"{storage.redact(source)}/{split}: no class has 2 readable images, so none can be held out")
    x_train, y_train = images[train_idx], torch.from_numpy(labels[train_idx])
    log.info("evaluator: %d classes, %d train and %d held-out images at %d px", len(listing.wnids),
             len(train_idx), len(held_idx), image_size)

    # Model and optimiser: AdamW with a linear warm-up then cosine decay to 0, per step.
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DomainClassifier(len(listing.wnids), widths, blocks, groups).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    # Loop.
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_idx), generator=gen)
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = torch.from_numpy(x_train[idx.numpy()]).to(device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
            x = augment(to_input(x, image_size), gen, shift, jitter, hflip)
            loss = F.cross_entropy(net(x)[1], y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        log.info("evaluator: epoch %d/%d loss %.4f", epoch + 1, epochs, loss_sum / len(order))

    # Held-out and training accuracy (no augmentation).
    held_acc = float((predict(net, images[held_idx], 256, device) == torch.from_numpy(labels[held_idx]))
                     .float().mean())
    train_acc = float((predict(net, x_train, 256, device) == y_train).float().mean())
    seconds = time.time() - start_time

    # Save: one file, written atomically.
    meta = {
        "wnids": list(listing.wnids), "image_size": image_size, "feature_dim": net.feature_dim,
        "arch": {"widths": list(widths), "blocks": blocks, "groups": groups},
        "source": storage.redact(source), "split": split, "classes": classes, "per_class": per_class,
        "seed": seed, "holdout_fraction": holdout_fraction,
        "train_keys": [keys[i] for i in train_idx], "train_labels": labels[train_idx].tolist(),
        "heldout_keys": [keys[i] for i in held_idx], "heldout_labels": labels[held_idx].tolist(),
        "heldout_accuracy": held_acc, "train_accuracy": train_acc,
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "hflip": hflip, "shift": shift, "jitter": jitter, "seconds": round(seconds, 1),
                     "torch": str(torch.__version__)},
        "rejected": rejected,
    }
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "meta": meta,
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, buf)
    storage.write_bytes(out_url, buf.getvalue(), storage_options)
    log.info("evaluator: held-out accuracy %.3f (train %.3f), %.1f s, saved to %s", held_acc, train_acc, seconds,
             storage.redact(out_url))
    return EvaluatorInfo(storage.redact(out_url), list(listing.wnids), image_size, net.feature_dim, len(train_idx),
                         len(held_idx), held_acc, train_acc, seconds, rejected)


def ensure_evaluator(path: str, source: str, *, split: str, image_size: int, classes: int | None,
                     per_class: int | None, settings: Any, storage_options: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """The metadata of the evaluator at `path`, training it on `source` first when there is none.

    `settings` is the config's fid.domain section (epochs, batch_size, holdout_fraction, hflip).
    """
    if not storage.exists(path, storage_options):
        log.info("training the domain evaluator on %s/%s (%d px) -> %s", storage.redact(source), split, image_size,
                 storage.redact(path))
        info = train_evaluator(source, split=split, image_size=image_size, out_url=path, classes=classes,
                               per_class=per_class, holdout_fraction=settings.holdout_fraction,
                               epochs=settings.epochs, batch_size=settings.batch_size, hflip=settings.hflip,
                               storage_options=storage_options)
        print(f"domain evaluator: {len(info.wnids)} classes, held-out accuracy {info.heldout_accuracy:.3f} "
              f"({info.num_heldout} images), {info.seconds:.0f} s -> {info.url}", flush=True)
    return read_metadata(path, storage_options)


