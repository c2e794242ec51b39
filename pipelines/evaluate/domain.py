"""The domain evaluator: a small classifier of the dataset's own images, as an offline Inception.

Without network there are no Inception weights, so FID says nothing offline. A small CNN
(models/domain_classifier.py) is trained on the real images of the dataset itself
(domain_training.py), and this module uses it the way FID uses Inception: its penultimate features (global average pool, `feature_dim` values) stand in for
Inception's pool features in FID, KID and precision/recall, and its logits give the class
accuracy of class-conditional samples (and an Inception-Score-like number). Every metric is
torch-fidelity's own code; the network is registered with torch-fidelity as the feature
extractor "sar-domain".

The numbers are comparable only between runs scored by the same evaluator file: they measure
distance in this network's feature space, not Inception's.

Reads   an evaluator file (local or object store): {"format": "sar-domain-evaluator", "version": 1,
        "state_dict": ..., "meta": {wnids in label order, image_size, feature_dim, arch, seed,
        source, split, train/heldout keys and labels, held-out and train accuracy, training
        settings, unreadable keys}}; images of an ImageNet-layout split (local or s3://), decoded
        with ADM's centre crop (pipelines/data/preprocess.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from models.domain_classifier import DomainClassifier, to_input
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data.imagenet import list_imagenet
from pipelines.data.preprocess import ERROR, KEY, LABEL, PIXELS, read_and_decode
from pipelines.evaluate import fidelity

log = logging.getLogger(__name__)

NAME = "sar-domain"  # torch-fidelity's name for the extractor
FORMAT, VERSION = "sar-domain-evaluator", 1
PENULTIMATE, LOGITS = "penultimate", "logits"
PRC_NEIGHBOURHOOD = fidelity.PRC_NEIGHBOURHOOD  # k = 3, torch-fidelity's and ADM's default
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults (Binkowski et al. use 1000)
ISC_SPLITS = fidelity.ISC_SPLITS
RNG_SEED = 2020  # torch-fidelity's default seed for KID subsets and IS shuffling
DECODE_CHUNK = 256  # files per concurrent read (one fs.cat call)


# Evaluator file --------------------------------------------------------------------------------
def _check_meta(url: str, blob: Any) -> dict[str, Any]:
    """The file's meta dict, or a one-line SarError naming the file."""
    name = storage.redact(url)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise SarError(f"{name}: not a sar domain evaluator file (no format '{FORMAT}'); "
                       f"make one with pipelines.evaluate.domain_training.train_evaluator")
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
                   ) -> tuple[DomainClassifier, dict[str, Any], str]:
    """(network in eval mode on the CPU, metadata, sha256 of the file) from an evaluator file."""
    blob, digest = _read_file(url, storage_options)
    meta = _check_meta(url, blob)
    arch = meta["arch"]
    net = DomainClassifier(len(meta["wnids"]), tuple(arch["widths"]), arch["blocks"], arch["groups"])
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
        self.images = fidelity.ImageArray(images).images
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


def split_images(source: str, split: str, wnids: Sequence[str], image_size: int,
                 storage_options: dict[str, Any] | None = None) -> LabelledImages | None:
    """The real images of `split` of an ImageNet-layout `source`, labelled in the evaluator's class
    order (`wnids`) and ADM-cropped to its size; None when the source has no `split`/ folder."""
    if not storage.exists(storage.join(source, split), storage_options):
        return None
    listing = list_imagenet(source, split, storage_options=storage_options)
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted({listing.wnids[label] for _, label in listing.items} - index.keys())
    if unknown:
        raise SarError(f"{storage.redact(source)}/{split}: classes the domain evaluator does not know "
                       f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    keys = [k for k, _ in listing.items]
    labels = [index[listing.wnids[label]] for _, label in listing.items]
    images, labels, keys, rejected = decode_keys(source, keys, labels, image_size, storage_options)
    if rejected:
        key, reason = next(iter(rejected.items()))
        raise SarError(f"{storage.redact(source)}/{split}: {len(rejected)} images cannot be read (first: {key}: {reason})")
    return LabelledImages(images, labels, keys)


@dataclass(frozen=True)
class RealSets:
    """The real images a sample set is scored against (`reference`) and compared with (`floor`: real
    images against the same reference), and where each came from."""

    reference: LabelledImages
    reference_from: str
    floor: LabelledImages | None = None
    floor_from: str | None = None


def real_sets(evaluator_path: str, source: str, reference_split: str, floor_split: str | None,
              need_floor: bool = True, storage_options: dict[str, Any] | None = None) -> RealSets:
    """The reference and floor images of the protocol: the source's `reference_split` and `floor_split`,
    each falling back to the evaluator's held-out training images when the source lacks the split
    (half B and half A of them when it lacks both)."""
    meta = read_metadata(evaluator_path, storage_options)
    size, wnids = meta["image_size"], meta["wnids"]
    reference = split_images(source, reference_split, wnids, size, storage_options)
    floor = split_images(source, floor_split, wnids, size, storage_options) if need_floor and floor_split else None
    held = "the evaluator's held-out training images"
    if reference is not None and (floor is not None or not need_floor):
        return RealSets(reference, f"{reference_split}/", floor, f"{floor_split}/" if floor is not None else None)
    heldout = reference_images(evaluator_path, source, storage_options)
    if reference is None and need_floor and floor is None:
        half_a, half_b = heldout.halves()
        return RealSets(half_b, f"{held}, half B", half_a, f"{held}, half A")
    if reference is None:
        return RealSets(heldout, held, floor, f"{floor_split}/" if floor is not None else None)
    return RealSets(reference, f"{reference_split}/", heldout, held)


def balanced_subset(images: LabelledImages, n: int) -> LabelledImages:
    """The first `n` images taken one class at a time in turn (each class's images in their order):
    as even over the classes as their sizes allow, and the same subset every time."""
    by_class = [list(np.flatnonzero(images.labels == label)) for label in np.unique(images.labels)]
    picked: list[int] = []
    while len(picked) < min(n, len(images)):
        for idx in by_class:
            if idx and len(picked) < n:
                picked.append(int(idx.pop(0)))
    return images.subset(sorted(picked))


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
        self.reference = fidelity.extract_features(reference, self.extractor, batch_size, self.cuda)[PENULTIMATE]

    @property
    def num_classes(self) -> int:
        return self.extractor.num_classes

    def _check_labels(self, labels, n: int) -> np.ndarray | None:
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise SarError(f"domain scoring: the samples' labels: expected ({n},) integers, got {labels.shape} {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise SarError(f"domain scoring: the samples' labels: values must be in [0, {self.num_classes}) (the evaluator's "
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
        n, m, ex = len(samples), self.num_reference, self.extractor
        if n == 0:
            raise SarError("domain scoring: no samples to score")
        labels = self._check_labels(labels, n)
        feats = fidelity.extract_features(samples, ex, self.batch_size, self.cuda)
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
            out["fid"] = fidelity.frechet_distance(*fidelity.statistics(f1), *fidelity.statistics(f2))

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
