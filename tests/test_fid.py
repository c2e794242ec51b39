"""sar fid: torch-fidelity's real code on a random-initialised Inception (no download), small sets.

Inception runs at 299 px whatever the input size, ~0.3-1 s per image on a CPU, so every test
here extracts features of at most 24 images.
"""

from __future__ import annotations

import os
import re
import urllib.error
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import fid as fid_job
from jobs.config import load_config
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.evaluate import fidelity, sampling
from tests.conftest import random_inception_weights

N_CLASSES, PER_CLASS = 4, 2  # 8 samples: PRC's k=3 needs more than 3 on each side


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8: distinct blocky colour patterns."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, 4, 4, 3))
    return np.repeat(np.repeat(base, size // 4, 1), size // 4, 2).astype(np.uint8)


def _noisy(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)


def _write_sample_set(folder: str, images: np.ndarray) -> None:
    """A finished sample set as `sar sample` leaves it (PNGs, index.json, _manifest.json)."""
    plan = sampling.SamplePlan(N_CLASSES, PER_CLASS, seed=0)
    rows = sampling.index_rows(plan, "png", 1000)
    for row, image in zip(rows, images):
        storage.write_bytes(storage.join(folder, row["file"]), sampling.png_bytes(image))
    storage.write_json(storage.join(folder, sampling.INDEX_FILE), rows)
    storage.write_json(storage.join(folder, sampling.MANIFEST_FILE), {
        "num_samples": plan.size, "per_class": PER_CLASS, "classes": N_CLASSES, "seed": 0,
        "guidance": {"kind": "xz_cfg", "w_x": 1.25, "w_z": 2.7}, "flow_steps": 7,
        "checkpoint": "ckpt/step_00000010", "checkpoint_digest": "abc123", "image_size": 32})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return random_inception_weights(str(tmp_path_factory.mktemp("inception") / "inception.pth"))


@pytest.fixture(scope="module")
def extractor(weights):
    return fidelity.load_inception(weights, cuda=False)


@pytest.fixture(scope="module")
def base_features(extractor) -> dict[str, torch.Tensor]:
    """Features of the clean set and of two noisier copies, in one extraction (24 images)."""
    clean = _images(8)
    stacked = np.concatenate([clean, _noisy(clean, 12), _noisy(clean, 48)])
    feats = fidelity.extract_features(fidelity.ImageArray(stacked), extractor, batch_size=24, cuda=False)
    return {name: feats[fidelity.FID_LAYER][i * 8:(i + 1) * 8] for i, name in enumerate(["clean", "noise12", "noise48"])}


def test_fid_grows_as_noise_is_added(base_features):
    # FID of the set against itself (~0) is checked end to end in the `sar fid` test below:
    # each FID is one 2048 x 2048 eigen-decomposition, the slow part on a CPU.
    assert base_features["clean"].std() > 1e-3  # the random Inception gives informative features
    mu, sigma = fidelity.statistics(base_features["clean"])
    fids = [fidelity.frechet_distance(mu, sigma, *fidelity.statistics(base_features[k])) for k in ("noise12", "noise48")]
    assert 1e-2 < fids[0] < fids[1]


def test_adm_style_npz_reference_loads_float32_statistics(tmp_path, extractor, base_features):
    # ADM's VIRTUAL_imagenet256_labeled.npz stores mu/sigma as float32 beside the images arr_0.
    mu, sigma = fidelity.statistics(base_features["clean"])
    path = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    ref = fidelity.load_reference(path, extractor, image_size=32, cache_url=str(tmp_path / "c.npz"), extractor_id="x",
                             need_features=True, batch_size=8, cuda=False)
    assert ref.mu.dtype == np.float64 and ref.sigma.dtype == np.float64 and ref.mu.shape == (2048,)
    assert ref.features is None  # no arr_0: statistics only, so no precision/recall
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6, atol=1e-9)

    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mu=np.zeros(64, np.float32), sigma=np.eye(64, dtype=np.float32))
    with pytest.raises(SarError, match=r"bad\.npz.*mu \(2048,\)"):
        fidelity.load_reference(bad, extractor, image_size=32, cache_url="", extractor_id="x", need_features=False,
                           batch_size=8, cuda=False)
    with pytest.raises(SarError, match="neither mu/sigma nor arr_0"):
        empty = str(tmp_path / "empty.npz")
        np.savez(empty, other=np.zeros(3))
        fidelity.load_reference(empty, extractor, image_size=32, cache_url="", extractor_id="x", need_features=False,
                           batch_size=8, cuda=False)


def test_npz_reference_images_give_precision_recall_features(tmp_path, extractor, base_features):
    mu, sigma = fidelity.statistics(base_features["clean"])
    path = str(tmp_path / "ref.npz")
    np.savez(path, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), arr_0=_images(8))
    ref = fidelity.load_reference(path, extractor, image_size=32, cache_url="", extractor_id="x", need_features=True,
                             batch_size=8, cuda=False)
    assert ref.count == 8 and tuple(ref.features.shape) == (8, 2048)
    torch.testing.assert_close(ref.features, base_features["clean"], rtol=1e-4, atol=1e-4)


def test_missing_weights_offline_is_a_clear_error(tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with mock.patch.object(tfi, "load_state_dict_from_url", offline), \
            pytest.raises(SarError, match=r"fid\.inception_weights") as err:
        fidelity.load_inception(None, cuda=False)
    assert "weights-inception-2015-12-05" in str(err.value)
    with pytest.raises(SarError, match=r"fid\.inception_weights: .*nowhere\.pth not found"):
        fidelity.load_inception(str(tmp_path / "nowhere.pth"), cuda=False)
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    with pytest.raises(SarError, match="is not torch-fidelity's inception-v3-compat state dict"):
        fidelity.load_inception(str(junk), cuda=False)


def _cfg(tmp_path, weights, **sets):
    overrides = [f"run_dir={tmp_path / 'run'}", f"fid.inception_weights={weights}", "fid.batch_size=8",
                 "fid.grid_classes=3", "fid.grid_per_class=2", *[f"{k}={v}" for k, v in sets.items()]]
    return load_config(None, overrides)


def test_sar_fid_against_the_same_images_and_without_reference(tmp_path, weights, capsys):
    images = _images(8)
    cfg = _cfg(tmp_path, weights)
    _write_sample_set(cfg.samples_dir, images)
    ref_dir = tmp_path / "reference" / "class_a"
    for i, image in enumerate(images):  # a reference folder, nested as ImageNet's val/<wnid>/
        storage.write_bytes(str(ref_dir / f"ref_{i}.png"), sampling.png_bytes(image))
    cfg.fid.reference = str(tmp_path / "reference")

    assert fid_job.main(cfg) == 0
    m = storage.read_json(os.path.join(cfg.eval_dir, "metrics.json"))
    assert abs(m["fid"]) < 1e-3 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["num_samples"] == 8 and m["inception_score"]["splits"] == 4 and m["inception_score"]["mean"] > 1.0
    assert m["checkpoint_digest"] == "abc123" and m["flow_steps"] == 7 and m["guidance"]["kind"] == "xz_cfg"
    assert m["reference_count"] == 8 and m["config"]["fid"]["grid_classes"] == 3
    # The folder's features are cached in eval/: a second load needs no Inception at all.
    cached = fidelity.load_reference(cfg.fid.reference, None, image_size=32, extractor_id=fidelity.weights_id(weights),
                                cache_url=os.path.join(cfg.eval_dir, fidelity.REFERENCE_CACHE), need_features=True,
                                batch_size=8, cuda=False)
    assert cached.count == 8 and tuple(cached.features.shape) == (8, 2048)
    # grid: 3 classes x 2 samples, 32 px images shown at 64 px with 2 px padding
    grid = Image.open(os.path.join(cfg.eval_dir, "grid.png"))
    assert grid.size == (2 + 2 * 66, 2 + 3 * 66)
    cell = np.asarray(grid)[2:66:2, 2:66:2]  # top-left cell, nearest-enlarged: every 2nd pixel
    assert np.array_equal(cell, images[0])

    # A reference that is set but missing is an error naming the field and the file, not a skip.
    cfg.fid.reference = str(tmp_path / "missing.npz")
    cfg.fid.output = str(tmp_path / "eval2")
    with pytest.raises(SarError, match=r"fid\.reference: not found: .*missing\.npz"):
        fid_job.main(cfg)
    assert not os.path.exists(os.path.join(cfg.eval_dir, "metrics.json"))

    # No reference at all: FID and precision/recall are skipped with the reason; IS is still computed.
    cfg.fid.reference = None
    assert fid_job.main(cfg) == 0
    m2 = storage.read_json(os.path.join(cfg.eval_dir, "metrics.json"))
    assert m2["fid"] is None and m2["precision"] is None and "fid.reference is not set" in m2["skipped"]["fid"]
    assert m2["inception_score"]["mean"] == pytest.approx(m["inception_score"]["mean"])
    assert "fid not computed" in capsys.readouterr().out


def test_sar_fid_needs_a_finished_sample_set(tmp_path, weights):
    cfg = _cfg(tmp_path, weights)
    with pytest.raises(SarError, match=r"_manifest\.json missing.*sar sample"):
        fid_job.main(cfg)


def test_npz_shards_dataset_reads_images_in_index_order(tmp_path):
    images = _images(5)
    rows = {sampling.INDEX: np.arange(5), sampling.LABEL: np.arange(5) // 2, sampling.SEED: np.arange(5)}
    for shard, sl in [(0, slice(0, 3)), (1, slice(3, 5))]:
        part = {k: v[sl] for k, v in rows.items()}
        storage.write_bytes(str(tmp_path / sampling.shard_name(shard)), sampling.npz_bytes(images[sl], part))
    ds = fidelity.NpzShards([str(tmp_path / sampling.shard_name(s)) for s in (0, 1)])
    assert len(ds) == 5
    for i in (4, 0, 3):
        assert torch.equal(ds[i], torch.from_numpy(images[i]).permute(2, 0, 1))
    with np.load(tmp_path / sampling.shard_name(1)) as z:
        assert z["arr_0"].shape == (2, 32, 32, 3) and z["index"].tolist() == [3, 4]


def test_samples_on_an_object_store_are_read_as_a_dataset(tmp_path, s3_bucket):
    images = _images(8)
    url = f"{s3_bucket}/samples"
    _write_sample_set(url, images)
    index = storage.read_json(f"{url}/{sampling.INDEX_FILE}")
    ds = fidelity.samples_dataset(url, index, str(tmp_path))
    assert len(ds) == 8 and torch.equal(ds[5], torch.from_numpy(images[5]).permute(2, 0, 1))
    storage.remove(f"{url}/images/000003.png")
    with pytest.raises(SarError, match=r"1 files of index\.json are missing \(first: images/000003\.png\)"):
        fidelity.samples_dataset(url, index, str(tmp_path / "again"))


def _sample_set_of(folder: str, images: np.ndarray, per_class: int) -> None:
    """A finished sample set holding `images`, class-major (`per_class` consecutive images per label)."""
    plan = sampling.SamplePlan(len(images) // per_class, per_class, seed=0)
    rows = sampling.index_rows(plan, "png", 1000)
    for row, image in zip(rows, images):
        storage.write_bytes(storage.join(folder, row["file"]), sampling.png_bytes(image))
    storage.write_json(storage.join(folder, sampling.INDEX_FILE), rows)
    storage.write_json(storage.join(folder, sampling.MANIFEST_FILE), {
        "num_samples": plan.size, "per_class": per_class, "classes": plan.num_classes, "seed": 0,
        "guidance": {"kind": "none"}, "flow_steps": 1, "checkpoint_digest": "real", "image_size": 32})


def test_sar_fid_with_the_domain_evaluator_scores_real_images_above_noise(tmp_path, capsys):
    """Offline scoring: the evaluator is trained on the dataset once, then real training images
    score a lower domain FID and a higher class accuracy than noise, each against the val images,
    beside the floor: test images against the same val images, as many as the samples."""
    from pipelines.data.synth import make_synthetic_imagenet
    from pipelines.evaluate import domain

    source = str(tmp_path / "imagenet")
    make_synthetic_imagenet(source, classes=4, per_class=8, size=32, seed=0, val_per_class=4, test_per_class=4)
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.source={source}", "encode.image_size=32",
                 "fid.evaluator=domain", "fid.domain.epochs=6", "fid.batch_size=16", "fid.grid_classes=2",
                 "fid.grid_per_class=2"]
    per_class = 4
    listing = sorted(os.listdir(os.path.join(source, "train")))
    real = np.stack([np.asarray(Image.open(os.path.join(source, "train", wnid, f)).convert("RGB"))
                     for wnid in listing for f in sorted(os.listdir(os.path.join(source, "train", wnid)))[:per_class]])
    scores = {}
    for name, images in [("real", real), ("noise", domain.noise_images(len(real), 32).images)]:
        cfg = load_config(None, [*overrides, f"sample.output={tmp_path / name}", f"fid.output={tmp_path / name}-eval"])
        _sample_set_of(cfg.samples_dir, images, per_class)
        assert fid_job.main(cfg) == 0
        scores[name] = storage.read_json(os.path.join(cfg.eval_dir, "metrics.json"))
    assert os.path.exists(tmp_path / "run" / "evaluator.pt")  # trained once, then reused
    real_m, noise_m = scores["real"]["domain"], scores["noise"]["domain"]
    assert real_m["fid"] < noise_m["fid"] / 5 and real_m["accuracy"] > noise_m["accuracy"] + 0.4
    assert scores["real"]["fid"] is None  # no Inception offline
    # The floor: 16 test images against the same 16 val images the 16 samples were scored against.
    floor = real_m["floor"]
    assert real_m["reference"] == {"images": "val/", "count": 16} and floor["images"] == "test/"
    assert (real_m["num_samples"], real_m["num_reference"]) == (floor["num_samples"], floor["num_reference"]) == (16, 16)
    assert floor["fid"] is not None and floor == noise_m["floor"]  # the same real sets whatever is scored
    assert scores["real"]["evaluator"] == "domain" and list(scores["real"]["skipped"]) == [
        "Inception FID, IS, precision and recall"]
    out = capsys.readouterr().out
    assert re.search(r"domain FID [\d.]+ \(16 samples vs 16 val/ images; real floor [\d.]+, 16 test/ vs the same 16\)",
                     out), out
    assert "class accuracy" in out and "not computed: fid.evaluator is 'domain'" in out


def test_the_floor_says_when_there_are_fewer_real_images_than_samples(tmp_path, synth_root):
    """Without val/ or test/ images enough for the samples the floor is smaller, and says it does not compare."""
    from pipelines.evaluate import domain

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source={synth_root}", "encode.image_size=32",
                             "fid.evaluator=domain", "fid.domain.epochs=1", "fid.batch_size=16", "fid.prc=false"])
    images = domain.noise_images(12, 32)
    from pipelines.evaluate import scoring

    scores = scoring.domain_metrics(cfg, images, np.array([0, 1, 2, 3] * 3))
    assert scores["reference"]["images"] == "val/" and scores["num_reference"] == 4  # synth_root: 1 val image a class
    floor = scores["floor"]
    assert floor["images"] == "the evaluator's held-out training images" and floor["num_samples"] < 12
    assert f"only {floor['num_samples']} real images for 12 samples" in floor["note"]
