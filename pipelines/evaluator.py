"""A domain evaluator: a small classifier of the dataset's own images, as an offline Inception.

Without network there are no Inception weights, so FID says nothing offline. This module
trains a small CNN on the real images of the dataset itself and uses it the way FID uses
Inception: its penultimate features (global average pool, `feature_dim` values) stand in for
Inception's pool features in FID, KID and precision/recall, and its logits give the class
accuracy of class-conditional samples (and an Inception-Score-like number). Every metric is
torch-fidelity's own code; the network is registered with torch-fidelity as the feature
extractor "sar-domain".

The numbers are comparable only between runs scored by the same evaluator file: they measure
distance in this network's feature space, not Inception's.

Reads   an ImageNet-layout split (local or s3://, pipelines.imagenet), decoded with ADM's centre
        crop (pipelines.preprocess); an evaluator file (local or object store).
Writes  one evaluator file (torch.save, written atomically through pipelines.storage):
        {"format": "sar-domain-evaluator", "version": 1, "state_dict": ..., "meta": {wnids in
        label order, image_size, feature_dim, arch, seed, source, split, train/heldout keys and
        labels, held-out and train accuracy, training settings, unreadable keys}}.

The per-class held-out split is recorded in the file, so the "floor" (real held-out images
against real images) is measured on images the evaluator never trained on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipelines import fid, storage
from pipelines.errors import SarError
from pipelines.imagenet import list_imagenet
from pipelines.preprocess import ERROR, KEY, LABEL, PIXELS, read_and_decode

log = logging.getLogger(__name__)

NAME = "sar-domain"  # torch-fidelity's name for the extractor
FORMAT, VERSION = "sar-domain-evaluator", 1
PENULTIMATE, LOGITS = "penultimate", "logits"
PRC_NEIGHBOURHOOD = fid.PRC_NEIGHBOURHOOD  # k = 3, torch-fidelity's and ADM's default
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults (Binkowski et al. use 1000)
ISC_SPLITS = fid.ISC_SPLITS
RNG_SEED = 2020  # torch-fidelity's default seed for KID subsets and IS shuffling
DECODE_CHUNK = 256  # files per concurrent read (one fs.cat call)


# Network ---------------------------------------------------------------------------------------
class EvaluatorNet(nn.Module):
    """Conv stages (conv3x3 -> GroupNorm -> ReLU, x blocks; 2x average-pool between stages) -> GAP -> linear.

    GroupNorm, not BatchNorm: a feature depends on its own image only, in training and in
    evaluation alike, so the features do not shift with the batch or with running statistics
    estimated from a few hundred images.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128, 128), blocks: int = 1,
                 groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):
            for _ in range(blocks):
                layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(groups, w), w),
                           nn.ReLU(inplace=True)]
                c_in = w
            if i < len(widths) - 1:
                layers.append(nn.AvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, feature_dim) penultimate features."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (features (B, D), logits (B, K))."""
        h = self.features(x)
        return h, self.head(h)


def to_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S) in [-1, 1] (ADM's x / 127.5 - 1), resized if H, W != S."""
    x = images.float()
    if x.shape[-2:] != (image_size, image_size):
        # Antialiased bilinear, as torchvision's Resize on tensors: a 256 px sample brought to a
        # 48 px evaluator must not alias (the training images were made by ADM's BOX+BICUBIC).
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 255)
    return x.div(127.5).sub(1.0)


# Evaluator file --------------------------------------------------------------------------------
def _check_meta(url: str, blob: Any) -> dict[str, Any]:
    """The file's meta dict, or a one-line SarError naming the file."""
    name = storage.redact(url)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SarError(f"{name}: not a sar domain evaluator file (no format '{FORMAT}'); "
                       f"make one with pipelines.evaluator.train_evaluator")
    if blob.get("version") != VERSION:
        raise SarError(f"{name}: evaluator file version {blob.get('version')!r}, this code reads {VERSION}")
    meta = blob.get("meta")
    required = ("wnids", "image_size", "feature_dim", "arch", "heldout_keys", "heldout_labels")
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(blob.get("state_dict"), dict):
        raise SarError(f"{name}: evaluator file lacks {', '.join(missing) or 'state_dict'}")
    return meta


def _read_file(url: str, storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(the file's content, sha256 of its bytes); read whole each time (no node-local cache that a
    retrained evaluator at the same URL could leave stale)."""
    try:
        data = storage.read_bytes(url, storage_options)
    except storage.NotFound:
        raise SarError(f"evaluator file {storage.redact(url)} not found") from None
    except storage.StorageError as err:
        raise SarError(f"evaluator file {storage.redact(url)}: {err}") from None
    try:
        # weights_only: the file holds tensors and plain Python values, never code.
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch raise many kinds; all mean "not ours"
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise SarError(f"{storage.redact(url)}: not a sar domain evaluator file ({type(err).__name__}: {first})") \
            from None
    return blob, hashlib.sha256(data).hexdigest()


def read_metadata(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluator file's metadata (wnids, image size, held-out keys, accuracy, ...)."""
    return _check_meta(url, _read_file(url, storage_options)[0])


def load_evaluator(url: str, storage_options: dict[str, Any] | None = None
                   ) -> tuple[EvaluatorNet, dict[str, Any], str]:
    """(network in eval mode on the CPU, metadata, sha256 of the file) from an evaluator file."""
    blob, digest = _read_file(url, storage_options)
    meta = _check_meta(url, blob)
    arch = meta["arch"]
    net = EvaluatorNet(len(meta["wnids"]), tuple(arch["widths"]), arch["blocks"], arch["groups"])
    try:
        net.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise SarError(f"{storage.redact(url)}: weights do not match the recorded architecture {arch} "
                       f"({str(err).splitlines()[0][:160]})") from None
    return net.eval(), meta, digest


# Data ------------------------------------------------------------------------------------------
class LabelledImages(Dataset):
    """(N, H, W, 3) uint8 images with labels (and source keys), as uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, keys: Sequence[str] | None = None):
        self.images = fid.ImageArray(images).images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = list(keys) if keys is not None else None
        if len(self.labels) != len(self.images):
            raise SarError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)

    def subset(self, indices: Sequence[int]) -> "LabelledImages":
        """The images at `indices`, with their labels and keys."""
        idx = np.asarray(indices, dtype=np.int64)
        keys = [self.keys[i] for i in idx] if self.keys is not None else None
        return LabelledImages(self.images[idx], self.labels[idx], keys)

    def halves(self) -> tuple["LabelledImages", "LabelledImages"]:
        """Two disjoint halves with the same classes: each class's images alternate between them.

        A class of odd size gives its extra image to the half that got none from the previous
        odd class, so the halves differ by at most one image overall.
        """
        halves: tuple[list[int], list[int]] = ([], [])
        offset = 0
        for label in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == label)
            for j, i in enumerate(idx):
                halves[(j + offset) % 2].append(int(i))
            offset = (offset + len(idx)) % 2
        return self.subset(sorted(halves[0])), self.subset(sorted(halves[1]))


def decode_keys(source: str, keys: Sequence[str], labels: Sequence[int], image_size: int,
                storage_options: dict[str, Any] | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str]]:
    """Read and ADM-crop `keys` of `source`: (images (N, S, S, 3) uint8, labels, keys, {unreadable key: reason})."""
    images, kept_labels, kept_keys, rejected = [], [], [], {}
    for start in range(0, len(keys), DECODE_CHUNK):
        batch = {KEY: np.array(keys[start:start + DECODE_CHUNK], dtype=object),
                 LABEL: np.asarray(labels[start:start + DECODE_CHUNK], dtype=np.int64)}
        out = read_and_decode(batch, root=source, image_size=image_size, storage_options=storage_options)
        for key, label, pixels, error in zip(out[KEY], out[LABEL], out[PIXELS], out[ERROR]):
            if error:
                rejected[str(key)] = str(error)
                continue
            images.append(pixels)
            kept_labels.append(int(label))
            kept_keys.append(str(key))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, np.asarray(kept_labels, np.int64), kept_keys, rejected


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


def noise_images(n: int, image_size: int, seed: int = 0) -> LabelledImages:
    """`n` images of uniform random uint8 pixels (label -1): the far end of any image metric."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    return LabelledImages(images, np.full(n, -1, np.int64))


def reference_images(evaluator_path: str, source: str,
                     storage_options: dict[str, Any] | None = None) -> LabelledImages:
    """The held-out real images recorded in the evaluator file, read from `source` (labels and keys kept)."""
    meta = read_metadata(evaluator_path, storage_options)
    images, labels, keys, rejected = decode_keys(source, meta["heldout_keys"], meta["heldout_labels"],
                                                 meta["image_size"], storage_options)
    if rejected:
        key, reason = next(iter(rejected.items()))
        raise SarError(f"{storage.redact(source)}: {len(rejected)} held-out images of evaluator "
                       f"{storage.redact(evaluator_path)} cannot be read (first: {key}: {reason})")
    return LabelledImages(images, labels, keys)


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
def predict(net: EvaluatorNet, images: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
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
    net = EvaluatorNet(len(listing.wnids), widths, blocks, groups).to(device)
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


def check_classes(meta: dict[str, Any], classes: Sequence[str] | None, where: str) -> None:
    """Refuse an evaluator whose classes (wnids in label order) are not the dataset's: accuracy would be meaningless."""
    if classes is not None and list(meta["wnids"]) != list(classes):
        raise SarError(f"{where}: the domain evaluator knows {len(meta['wnids'])} classes "
                       f"({', '.join(meta['wnids'][:3])}, ...), the dataset has {len(classes)} "
                       f"({', '.join(list(classes)[:3])}, ...); set fid.domain.path to a new file to retrain it")


# torch-fidelity feature extractor --------------------------------------------------------------
class DomainExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over an evaluator file: uint8 (N, 3, H, W) -> penultimate, logits.

    Created by torch-fidelity (`create_feature_extractor("sar-domain", [...],
    feature_extractor_weights_path=<evaluator file, local path or URL>)`); inputs of another size
    are resized to the evaluator's, as torch-fidelity's Inception resizes to 299 px.
    """

    def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None,
                 storage_options: dict[str, Any] | None = None, **kwargs):
        super().__init__(name, list(features_list))
        if not feature_extractor_weights_path:
            raise SarError(f"feature extractor {name}: needs feature_extractor_weights_path (an evaluator file)")
        self.net, self.meta, self.digest = load_evaluator(feature_extractor_weights_path, storage_options)
        self.url = storage.redact(feature_extractor_weights_path)
        self.image_size = int(self.meta["image_size"])
        self.num_classes = len(self.meta["wnids"])

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return PENULTIMATE, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": LOGITS, "fid": PENULTIMATE, "kid": PENULTIMATE, "prc": PENULTIMATE}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False  # a few small convolutions: compiling costs more than it saves

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return (torch.rand([1, 3, 4, 4]) * 255).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (N, 3, H, W) -> the requested features in features_list order, float32 (N, D) / (N, K)."""
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise SarError(f"feature extractor {self.name}: expected uint8 (N, 3, H, W) images, got {got}")
        h, logits = self.net(to_input(x, self.image_size))
        out = {PENULTIMATE: h.float(), LOGITS: logits.float()}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Register DomainExtractor with torch-fidelity under NAME, once per process."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, DomainExtractor)


register()


# Metrics ---------------------------------------------------------------------------------------
def create_extractor(evaluator_path: str, cuda: bool, storage_options: dict[str, Any] | None = None):
    """torch-fidelity's `create_feature_extractor` for NAME, both feature layers."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(NAME, [PENULTIMATE, LOGITS], cuda=cuda,
                                    feature_extractor_weights_path=evaluator_path, storage_options=storage_options,
                                    verbose=False)


class DomainScorer:
    """Scores sample sets against one reference set with one evaluator; the reference's features
    are extracted once, so scoring during training costs only the samples' forward pass."""

    def __init__(self, evaluator_path: str, reference: Dataset, *, batch_size: int = 64, cuda: bool | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.batch_size = batch_size
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.extractor = create_extractor(evaluator_path, self.cuda, storage_options)
        self.num_reference = len(reference)
        if self.num_reference == 0:
            raise SarError(f"evaluator {storage.redact(evaluator_path)}: the reference set is empty")
        self.reference = fid.extract_features(reference, self.extractor, batch_size, self.cuda)[PENULTIMATE]

    @property
    def num_classes(self) -> int:
        return self.extractor.num_classes

    def _check_labels(self, labels, n: int) -> np.ndarray | None:
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise SarError(f"evaluate_samples labels: expected ({n},) integers, got {labels.shape} {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise SarError(f"evaluate_samples labels: values must be in [0, {self.num_classes}) (the evaluator's "
                           f"classes), got [{labels.min()}, {labels.max()}]")
        return labels

    def score(self, samples: Dataset, labels: np.ndarray | Sequence[int] | None = None, *, kid: bool = True,
              prc: bool = True) -> dict[str, Any]:
        """Domain FID / KID / precision / recall of `samples` against the reference, and class accuracy.

        `samples` yields uint8 (3, H, W) tensors; `labels` are their intended classes (None: no
        accuracy). Returns fid, kid {mean, std, subset_size, subsets}, precision, recall,
        accuracy, domain_is {mean, std, splits} (the Inception Score's formula on the evaluator's
        logits), num_samples, num_reference, and the evaluator's path, sha256 and held-out
        accuracy; what cannot be computed is None, with the reason in `skipped`.
        """
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        n, m, ex = len(samples), self.num_reference, self.extractor
        if n == 0:
            raise SarError("evaluate_samples: no samples to score")
        labels = self._check_labels(labels, n)
        feats = fid.extract_features(samples, ex, self.batch_size, self.cuda)
        f1, f2 = feats[PENULTIMATE], self.reference
        out: dict[str, Any] = {"fid": None, "kid": None, "precision": None, "recall": None, "accuracy": None,
                               "domain_is": None, "num_samples": n, "num_reference": m, "skipped": {},
                               "feature_extractor": NAME, "feature_dim": int(f1.shape[1]),
                               "evaluator": {"path": ex.url, "sha256": ex.digest,
                                             "heldout_accuracy": ex.meta.get("heldout_accuracy"),
                                             "image_size": ex.image_size, "classes": self.num_classes}}

        # FID: a covariance needs at least 2 images per side.
        if min(n, m) < 2:
            out["skipped"]["fid"] = f"needs at least 2 images on each side (samples {n}, reference {m})"
        else:
            out["fid"] = fid.frechet_distance(*fid.statistics(f1), *fid.statistics(f2))

        # KID: torch-fidelity draws subsets of kid_subset_size from each side without replacement,
        # so the size is min(1000, n, m); the unbiased MMD estimate needs at least 2.
        if kid:
            size = min(KID_SUBSET_SIZE, n, m)
            if size < 2:
                out["skipped"]["kid"] = f"needs at least 2 images on each side (samples {n}, reference {m})"
            else:
                r = kid_features_to_metric(f1, f2, kid_subsets=KID_SUBSETS, kid_subset_size=size, verbose=False,
                                           rng_seed=RNG_SEED)
                out["kid"] = {"mean": r[KEY_METRIC_KID_MEAN], "std": r[KEY_METRIC_KID_STD], "subset_size": size,
                              "subsets": KID_SUBSETS}
                if size < KID_SUBSET_SIZE:
                    # A subset as large as a set is that whole set: std then comes from the other side only.
                    out["kid"]["note"] = (f"subset size {size} < {KID_SUBSET_SIZE}: the smaller set's size; a "
                                          f"subset that large is the whole set, so std reflects only the larger "
                                          f"set's draws")

        # Precision/recall: each image's k-th nearest neighbour among its own set (itself included).
        if prc:
            if min(n, m) <= PRC_NEIGHBOURHOOD:
                out["skipped"]["precision_recall"] = (f"needs more than k={PRC_NEIGHBOURHOOD} images on each "
                                                      f"side (samples {n}, reference {m})")
            else:
                r = prc_features_to_metric(f1, f2, prc_neighborhood=PRC_NEIGHBOURHOOD, verbose=False,
                                           save_cpu_ram=True)
                out["precision"], out["recall"] = r[KEY_METRIC_PRECISION], r[KEY_METRIC_RECALL]

        # Class accuracy and an Inception-Score-like number, both from the evaluator's logits.
        logits = feats[LOGITS]
        if labels is None:
            out["skipped"]["accuracy"] = "no labels given for the samples"
        else:
            out["accuracy"] = float((logits.argmax(dim=1).numpy() == labels).mean())
        splits = min(ISC_SPLITS, max(1, n // 2))  # a split of one image always scores exactly 1
        r = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=RNG_SEED)
        out["domain_is"] = {"mean": r[KEY_METRIC_ISC_MEAN], "std": r[KEY_METRIC_ISC_STD], "splits": splits}
        return out


def evaluate_samples(samples: Dataset, labels: np.ndarray | Sequence[int] | None, reference: Dataset,
                     evaluator_path: str, *, batch_size: int = 64, kid: bool = True, prc: bool = True,
                     cuda: bool | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Domain metrics of one sample set against `reference` (see DomainScorer.score)."""
    scorer = DomainScorer(evaluator_path, reference, batch_size=batch_size, cuda=cuda, storage_options=storage_options)
    return scorer.score(samples, labels, kid=kid, prc=prc)
