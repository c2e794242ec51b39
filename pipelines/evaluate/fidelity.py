"""FID, Inception Score, precision and recall with torch-fidelity, and the sample grid.

All four use torch-fidelity's `inception-v3-compat`, the TF-exact Inception of the original
FID code (ADM's evaluator and MAR use the same network): pool features ('2048') for FID and
precision/recall, unbiased logits for the Inception Score. Feature extraction, statistics and
the metrics are torch-fidelity's own functions; this module only feeds them.

The reference is either
  - a statistics file: ADM's `VIRTUAL_imagenet256_labeled.npz` (`mu`, `sigma`, float32, and
    `arr_0`, its 10,000 reference images, used for precision/recall), or any .npz with those
    keys; torch-fidelity's FID wants float64 statistics of one dtype, so both sides are cast;
  - a folder of reference images prepared as the training images (ADM's center crop at the
    samples' size); their features are computed once and cached in the eval folder.

Inception weights come from `fid.inception_weights` (a local or object-store copy of
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`) or torch-fidelity's download.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.core.rundir import StageStatus
from pipelines.data.preprocess import center_crop_arr, to_rgb

log = logging.getLogger(__name__)

EXTRACTOR = "inception-v3-compat"
FID_LAYER, ISC_LAYER, PRC_LAYER = "2048", "logits_unbiased", "2048"  # torch-fidelity's defaults
PRC_NEIGHBOURHOOD = 3  # k of Kynkaanniemi et al. (2019), torch-fidelity's and ADM's default
ISC_SPLITS = 10  # Salimans et al. (2016)
REFERENCE_CACHE = "reference_features.npz"
METRICS_FILE, GRID_FILE = "metrics.json", "grid.png"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPEG", ".PNG", ".JPG")


# Inception ----------------------------------------------------------------------------------------
def _weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def load_inception(weights: str | None, cuda: bool, storage_options: dict[str, Any] | None = None):
    """torch-fidelity's inception-v3-compat, from `weights` or torch-fidelity's own download."""
    from torch_fidelity.utils import create_feature_extractor

    path = None
    if weights:
        try:
            with storage.field("fid.inception_weights"):
                path = storage.local_copy(weights, storage_options)
        except storage.NotFound:
            raise SarError(f"fid.inception_weights: {storage.redact(weights)} not found") from None
    layers = sorted({FID_LAYER, ISC_LAYER, PRC_LAYER})
    try:
        return create_feature_extractor(EXTRACTOR, layers, cuda=cuda, feature_extractor_weights_path=path,
                                        verbose=False)
    except Exception as err:  # noqa: BLE001 - a download or a load; either way the user must act
        if path is None:
            raise SarError(
                f"cannot get the Inception weights for FID ({type(err).__name__}: {err}); without network, "
                f"download {_weights_url()} elsewhere and set fid.inception_weights to its local or "
                f"object-store path") from None
        raise SarError(f"fid.inception_weights: {storage.redact(weights)} is not torch-fidelity's "
                       f"{EXTRACTOR} state dict ({type(err).__name__}: {str(err)[:200]})") from None


def weights_id(weights: str | None, storage_options: dict[str, Any] | None = None) -> str:
    """What identifies the Inception weights (for caches and metrics.json)."""
    if not weights:
        return _weights_url()
    with storage.field("fid.inception_weights"):
        return f"sha256:{storage.sha256_file(storage.local_copy(weights, storage_options))}"


def extract_features(dataset: Dataset, extractor, batch_size: int, cuda: bool) -> dict[str, torch.Tensor]:
    """torch-fidelity's features of a Dataset of uint8 (3, H, W) tensors: {layer: (N, C)}."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id

    # save_cpu_ram: no DataLoader worker processes for small sets (forking costs more than it saves).
    return extract_featuresdict_from_input_id(1, extractor, input1=dataset, batch_size=batch_size, cuda=cuda,
                                              verbose=False, save_cpu_ram=len(dataset) < 2048)


# Datasets ---------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Local image files as uint8 (3, H, W); other sizes are brought to `size` by ADM's center crop."""

    def __init__(self, paths: list[str], size: int | None = None):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            im = to_rgb(im)
            arr = np.array(im) if self.size is None or im.size == (self.size, self.size) \
                else center_crop_arr(im, self.size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


class ImageArray(Dataset):
    """An (N, H, W, 3) uint8 array (ADM's `arr_0`) as uint8 (3, H, W) tensors."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise SarError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


class NpzShards(Dataset):
    """Images of the sample stage's .npz shards (`arr_0`), one shard in memory at a time."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.counts = []
        for p in paths:
            with np.load(p) as z:
                self.counts.append(int(z["index"].shape[0]))
        self.starts = np.cumsum([0] + self.counts)
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._cached is None or self._cached[0] != shard:
            with np.load(self.paths[shard]) as z:
                self._cached = (shard, z["arr_0"])
        return torch.from_numpy(np.ascontiguousarray(self._cached[1][i - self.starts[shard]])).permute(2, 0, 1)


def _local_folder(url: str, storage_options: dict[str, Any] | None, staging: str) -> str:
    """`url` itself when local, else a download of it into `staging`."""
    if storage.is_local(url):
        return str(url).removeprefix("file://")
    target = os.path.join(staging, "data")
    storage.download_dir(url, target, storage_options)
    return target


def samples_dataset(samples_dir: str, index: list[dict[str, Any]], staging: str,
                    storage_options: dict[str, Any] | None = None) -> Dataset:
    """The sample set as a Dataset, in index order (object-store sets are downloaded to `staging`)."""
    local = _local_folder(samples_dir, storage_options, staging)
    files = list(dict.fromkeys(e["file"] for e in index))
    paths = [os.path.join(local, f) for f in files]
    missing = [f for f, p in zip(files, paths) if not os.path.exists(p)]
    if missing:
        raise SarError(f"{storage.redact(samples_dir)}: {len(missing)} files of index.json are missing "
                       f"(first: {missing[0]}); re-run `sar sample`")
    if files and files[0].endswith(".npz"):
        return NpzShards(paths)
    return ImageFiles(paths)


# Reference --------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Reference statistics (float64, as torch-fidelity's FID wants) and, if any, features for PRC."""

    source: str
    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None = None
    count: int | None = None


def statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of pool features, by torch-fidelity, in float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    s = fid_features_to_statistics(features.double())
    return s["mu"].astype(np.float64), s["sigma"].astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """torch-fidelity's FID of two Gaussians; both sides cast to float64 (ADM's file is float32)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    f64 = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    out = fid_statistics_to_metric({"mu": f64[0], "sigma": f64[1]}, {"mu": f64[2], "sigma": f64[3]}, verbose=False)
    return float(out[KEY_METRIC_FID])


def _check_stats(url: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or d != 2048:
        raise SarError(f"{storage.redact(url)}: expected mu (2048,) and sigma (2048, 2048) of Inception pool "
                       f"features, got mu {mu.shape} and sigma {sigma.shape}")


def _reference_from_npz(url: str, extractor, need_features: bool, batch_size: int, cuda: bool,
                        storage_options: dict[str, Any] | None) -> Reference:
    try:
        z = np.load(storage.local_copy(url, storage_options))
    except storage.StorageError:
        raise  # the store's own one-line error (not found, access denied, ...)
    except (OSError, ValueError) as err:
        raise SarError(f"fid.reference: {storage.redact(url)} is not a readable .npz ({err})") from None
    with z:
        keys = set(z.files)
        has_images = "arr_0" in keys
        if not ({"mu", "sigma"} <= keys or has_images):
            raise SarError(f"fid.reference: {storage.redact(url)} has neither mu/sigma nor arr_0 images "
                           f"(keys: {sorted(keys)})")
        features = None
        if has_images and (need_features or not {"mu", "sigma"} <= keys):
            features = extract_features(ImageArray(z["arr_0"]), extractor, batch_size, cuda)[PRC_LAYER]
        if {"mu", "sigma"} <= keys:
            mu, sigma = z["mu"], z["sigma"]
        else:
            mu, sigma = statistics(features)
        _check_stats(url, mu, sigma)
        return Reference(storage.redact(url), mu.astype(np.float64), sigma.astype(np.float64), features,
                         int(z["arr_0"].shape[0]) if has_images else None)


def _reference_from_folder(url: str, extractor, image_size: int | None, cache_url: str, extractor_id: str,
                           batch_size: int, cuda: bool, storage_options: dict[str, Any] | None) -> Reference:
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    files = sorted({posixpath.relpath(p, root) for ext in IMAGE_EXTENSIONS for p in fs.glob(f"{root}/**/*{ext}")})
    if not files:
        raise SarError(f"fid.reference: no images ({', '.join(IMAGE_EXTENSIONS[:3])}) under {storage.redact(url)}")
    key = json.dumps({"reference": storage.redact(url), "count": len(files), "image_size": image_size,
                      "extractor": EXTRACTOR, "weights": extractor_id}, sort_keys=True)
    if storage.exists(cache_url, storage_options):
        with np.load(io.BytesIO(storage.read_bytes(cache_url, storage_options))) as z:
            if str(z["key"]) == key:
                log.info("fid: reference features from the cache %s", storage.redact(cache_url))
                return Reference(storage.redact(url), z["mu"], z["sigma"], torch.from_numpy(z["features"]),
                                 len(files))
    with tempfile.TemporaryDirectory(prefix="sar-ref-") as staging:
        local = _local_folder(url, storage_options, staging)
        paths = [os.path.join(local, *f.split("/")) for f in files]
        features = extract_features(ImageFiles(paths, image_size), extractor, batch_size, cuda)[PRC_LAYER]
    mu, sigma = statistics(features)
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), mu=mu, sigma=sigma, features=features.numpy())
    storage.write_bytes(cache_url, buf.getvalue(), storage_options)
    return Reference(storage.redact(url), mu, sigma, features, len(files))


def load_reference(url: str, extractor, *, image_size: int | None, cache_url: str, extractor_id: str,
                   need_features: bool, batch_size: int, cuda: bool,
                   storage_options: dict[str, Any] | None = None) -> Reference:
    """Reference statistics from an .npz statistics file or an image folder (features cached)."""
    with storage.field("fid.reference"):
        if str(url).endswith(".npz"):
            return _reference_from_npz(url, extractor, need_features, batch_size, cuda, storage_options)
        return _reference_from_folder(url, extractor, image_size, cache_url, extractor_id, batch_size, cuda,
                                      storage_options)


# Metrics --------------------------------------------------------------------------------------
def compute_metrics(samples: Dataset, reference: Reference | None, extractor, *, batch_size: int, cuda: bool,
                    isc: bool = True, prc: bool = True) -> dict[str, Any]:
    """FID / IS / precision / recall of a Dataset of uint8 images; None where not computable (with why)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    feats = extract_features(samples, extractor, batch_size, cuda)
    n = len(samples)
    out: dict[str, Any] = {"num_samples": n, "fid": None, "precision": None, "recall": None,
                           "inception_score": None, "skipped": {}}
    if isc:
        # 10 splits as Salimans et al.; a split of one image always scores exactly 1, so small
        # sets get fewer splits of at least two.
        splits = min(ISC_SPLITS, max(1, n // 2))
        s = isc_features_to_metric(feats[ISC_LAYER], splits=splits, shuffle=True, rng_seed=2020)
        out["inception_score"] = {"mean": s["inception_score_mean"], "std": s["inception_score_std"],
                                  "splits": splits}
    if reference is None:
        return out
    mu, sigma = statistics(feats[FID_LAYER])
    out["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if prc:
        if reference.features is None:
            out["skipped"]["precision_recall"] = "the reference has statistics only, no images (arr_0)"
        elif min(n, len(reference.features)) <= PRC_NEIGHBOURHOOD:
            out["skipped"]["precision_recall"] = f"needs more than {PRC_NEIGHBOURHOOD} images on each side"
        else:
            r = prc_features_to_metric(feats[PRC_LAYER], reference.features.float(),
                                       prc_neighborhood=PRC_NEIGHBOURHOOD, verbose=False,
                                       # the blockwise distances: 50,000 x 50,000 in one matrix is 10 GB
                                       save_cpu_ram=True)
            out["precision"], out["recall"] = r[KEY_METRIC_PRECISION], r[KEY_METRIC_RECALL]
    return out


# metrics.json -----------------------------------------------------------------------------------
def sample_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json records of the sample set it scored."""
    return {k: manifest.get(k) for k in ("num_samples", "guidance", "flow_steps", "checkpoint",
                                          "checkpoint_digest", "checkpoint_step")}


def skipped_metrics(reason: str) -> dict[str, Any]:
    """The Inception metrics of a set scored without Inception: none, and why (once)."""
    return {"fid": None, "inception_score": None, "precision": None, "recall": None,
            "skipped": {"Inception FID, IS, precision and recall": reason}}


def reference_problem(reference: str | None, storage_options: dict[str, Any] | None = None) -> str | None:
    """Why FID is not computed: fid.reference is not set; None when it is set and exists.

    A reference that is set but missing is a mistake (a typo, an unmounted folder), not a reason to
    skip: it raises SarError naming the field and the location.
    """
    if not reference:
        return "fid.reference is not set (ADM's VIRTUAL_imagenet256_labeled.npz or an image folder)"
    with storage.field("fid.reference"):
        if not storage.exists(reference, storage_options):
            raise SarError(f"fid.reference: not found: {storage.redact(reference)} (ADM's "
                           "VIRTUAL_imagenet256_labeled.npz or an image folder; unset it to score without FID)")
    return None


def write_metrics(eval_dir: str, metrics: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    storage.write_json(storage.join(eval_dir, METRICS_FILE), metrics, storage_options)


def metrics_status(eval_dir: str, samples_dir: str, evaluator: str, storage_options: dict[str, Any] | None = None):
    """Up to date when metrics.json scored the sample set now in `samples_dir` with `evaluator`
    (a rundir.StageStatus)."""
    metrics_url = storage.join(eval_dir, METRICS_FILE)
    samples_url = storage.join(samples_dir, "_manifest.json")
    if not storage.exists(metrics_url, storage_options) or not storage.exists(samples_url, storage_options):
        return StageStatus(False, "no metrics")
    metrics, samples = storage.read_json(metrics_url, storage_options), storage.read_json(samples_url, storage_options)
    if metrics.get("checkpoint_digest") != samples.get("checkpoint_digest"):
        return StageStatus(False, "the samples changed")
    if metrics.get("num_samples") != samples.get("num_samples"):
        return StageStatus(False, "the sample count changed")
    if metrics.get("evaluator", "inception") != evaluator:
        return StageStatus(False, f"scored by the {metrics.get('evaluator', 'inception')} evaluator, not {evaluator}")
    return StageStatus(True, "metrics of the current samples")
