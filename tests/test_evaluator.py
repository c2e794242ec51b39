"""The domain evaluator: training on a tiny synthetic set, its file, torch-fidelity with it, its metrics.

One evaluator (4 classes x 20 images, 32 px, 30% held out, 8 epochs: about a second on a CPU)
is trained per module and shared.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data.imagenet import list_imagenet
from pipelines.data.synth import make_synthetic_imagenet
from pipelines.evaluate import domain as ev
from pipelines.evaluate import domain_training
from tests.conftest import upload_tree

CLASSES, PER_CLASS, SIZE, HOLDOUT = 4, 20, 32, 0.3


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("imagenet4"))
    make_synthetic_imagenet(root, classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=0, val_per_class=0)
    return root


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory) -> tuple[domain_training.EvaluatorInfo, str]:
    path = str(tmp_path_factory.mktemp("evaluator") / "evaluator.pt")
    info = domain_training.train_evaluator(source, image_size=SIZE, out_url=path, holdout_fraction=HOLDOUT, epochs=8,
                              batch_size=12, seed=0)
    return info, path


@pytest.fixture(scope="module")
def heldout(trained, source) -> ev.LabelledImages:
    return ev.reference_images(trained[1], source)


# Training and the file ---------------------------------------------------------------------------
def test_training_beats_chance_on_heldout_images(trained, source):
    info, path = trained
    assert (info.num_train, info.num_heldout) == (56, 24)  # round(0.3 * 20) = 6 of each class held out
    assert info.heldout_accuracy >= 0.75  # chance is 0.25

    meta = ev.read_metadata(path)
    all_keys = list_imagenet(source).keys
    assert set(meta["train_keys"]).isdisjoint(meta["heldout_keys"])
    assert sorted(meta["train_keys"] + meta["heldout_keys"]) == sorted(all_keys)
    assert np.bincount(meta["heldout_labels"], minlength=CLASSES).tolist() == [6] * CLASSES
    # Labels recorded with the keys are the class folders' (train/<wnid>/...).
    assert all(key.split("/")[1] == meta["wnids"][label]
               for key, label in zip(meta["heldout_keys"], meta["heldout_labels"]))
    assert (meta["image_size"], meta["feature_dim"], meta["seed"], meta["source"]) == (SIZE, 128, 0, source)
    assert meta["heldout_accuracy"] == info.heldout_accuracy and meta["training"]["hflip"] is False


def test_saved_file_loads_back_with_identical_features(trained, heldout, s3_bucket):
    info, path = trained
    local = ev.create_extractor(path, cuda=False)
    x = torch.stack([heldout[i] for i in range(len(heldout))])  # (24, 3, 32, 32) uint8
    with torch.no_grad():
        feats, logits = local(x)
    assert feats.shape == (24, 128) and logits.shape == (24, CLASSES) and feats.std() > 1e-3
    # The loaded weights are the trained ones: they reproduce the accuracy measured at training.
    accuracy = float((logits.argmax(1).numpy() == heldout.labels).mean())
    assert accuracy == pytest.approx(info.heldout_accuracy)

    # The same file from an object store gives the same features, bit for bit.
    remote = f"{s3_bucket}/evaluators/evaluator.pt"
    storage.write_bytes(remote, storage.read_bytes(path))
    from_store = ev.create_extractor(remote, cuda=False)
    with torch.no_grad():
        feats2, logits2 = from_store(x)
    assert torch.equal(feats, feats2) and torch.equal(logits, logits2)
    assert local.digest == from_store.digest == hashlib.sha256(storage.read_bytes(path)).hexdigest()

    # Another input size is resized to the evaluator's: a 2x upscale comes back to nearly the same
    # features (under 1% apart; fed at 64 px without the resize, about 17% apart).
    with torch.no_grad():
        up, _ = local(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert (up - feats).norm() < 0.03 * feats.norm()


def test_training_reads_an_object_store_source_and_splits_as_locally(source, trained, s3_bucket):
    url = f"{s3_bucket}/imagenet"
    upload_tree(source, url)
    out = f"{s3_bucket}/evaluators/from_s3.pt"
    info = domain_training.train_evaluator(url, image_size=SIZE, out_url=out, holdout_fraction=HOLDOUT, epochs=1, batch_size=12,
                              seed=0)
    meta, local_meta = ev.read_metadata(out), ev.read_metadata(trained[1])
    assert meta["source"] == url and info.url == out
    # The split is a function of (keys, labels, fraction, seed), not of where the files are.
    assert meta["heldout_keys"] == local_meta["heldout_keys"]
    images = ev.reference_images(out, url)
    np.testing.assert_array_equal(images.images, ev.reference_images(trained[1], source).images)


def test_per_class_split_is_deterministic_by_seed():
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    train, held = domain_training.split_per_class(labels, HOLDOUT, seed=0)
    again = domain_training.split_per_class(labels, HOLDOUT, seed=0)
    other = domain_training.split_per_class(labels, HOLDOUT, seed=1)
    assert np.array_equal(held, again[1]) and np.array_equal(train, again[0])
    assert not np.array_equal(held, other[1])
    assert np.bincount(labels[held]).tolist() == [6] * CLASSES
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
    # A class of one image cannot be held out; a class of two holds out one.
    train, held = domain_training.split_per_class(np.array([0, 1, 1]), 0.2, seed=0)
    assert train.tolist().count(0) == 1 and len(held) == 1 and held[0] in (1, 2)


def test_augmentation_flips_only_when_asked():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    assert torch.equal(domain_training.augment(x, gen, shift=0, jitter=0.0, hflip=False), x)
    flipped = domain_training.augment(x, gen, shift=0, jitter=0.0, hflip=True)
    same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 16
    jittered = domain_training.augment(x, gen, shift=2, jitter=0.1, hflip=False)
    assert jittered.shape == x.shape and jittered.abs().max() <= 1 and not torch.equal(jittered, x)


# torch-fidelity ----------------------------------------------------------------------------------
def test_extractor_is_registered_once_and_survives_a_second_import():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[ev.NAME] is ev.DomainExtractor
    ev.register()  # a second registration is a no-op, not torch-fidelity's "already registered"
    original = sys.modules.pop("pipelines.evaluate.domain")
    try:
        fresh = importlib.import_module("pipelines.evaluate.domain")  # runs the module (and its register) again
        assert fresh is not original
    finally:
        sys.modules["pipelines.evaluate.domain"] = original
        sys.modules["pipelines"].evaluator = original
    assert FEATURE_EXTRACTORS_REGISTRY[ev.NAME] is ev.DomainExtractor
    assert ev.DomainExtractor.get_default_feature_layer_for_metric("fid") == ev.PENULTIMATE
    assert ev.DomainExtractor.get_default_feature_layer_for_metric("isc") == ev.LOGITS


def test_torch_fidelity_calculate_metrics_runs_with_the_extractor(trained, heldout):
    import torch_fidelity

    path = trained[1]
    a, b = heldout.halves()
    got = torch_fidelity.calculate_metrics(
        input1=a, input2=b, feature_extractor=ev.NAME, feature_extractor_weights_path=path, cuda=False,
        fid=True, kid=True, prc=True, isc=True, kid_subset_size=len(a), isc_splits=6, batch_size=8,
        cache=False, save_cpu_ram=True, verbose=False)
    ours = ev.evaluate_samples(a, a.labels, b, path, batch_size=8, cuda=False)
    # Same features, same torch-fidelity functions: the same numbers (FID: ours in float64 throughout).
    assert got[torch_fidelity.KEY_METRIC_FID] == pytest.approx(ours["fid"], rel=1e-3, abs=1e-4)
    assert got[torch_fidelity.KEY_METRIC_KID_MEAN] == pytest.approx(ours["kid"]["mean"], rel=1e-5, abs=1e-7)
    assert got[torch_fidelity.KEY_METRIC_PRECISION] == ours["precision"]
    assert got[torch_fidelity.KEY_METRIC_RECALL] == ours["recall"]
    assert got[torch_fidelity.KEY_METRIC_ISC_MEAN] == pytest.approx(ours["domain_is"]["mean"], rel=1e-6)
    assert ours["kid"]["subset_size"] == len(a) == 12 and "whole set" in ours["kid"]["note"]


# Metrics -----------------------------------------------------------------------------------------
def test_heldout_real_images_score_better_than_noise_and_degraded_sets(trained, heldout):
    path = trained[1]
    a, b = heldout.halves()

    def score(images: np.ndarray, labels: np.ndarray) -> dict:
        return ev.evaluate_samples(ev.LabelledImages(images, labels), labels, b, path, batch_size=8, cuda=False)

    floor = score(a.images, a.labels)
    noise = ev.evaluate_samples(ev.noise_images(len(a), SIZE, seed=1), a.labels, b, path, batch_size=8, cuda=False)
    shuffled = score(a.images, (a.labels + 1) % CLASSES)  # every label moved to another class
    blurred = score(np.stack([np.array(Image.fromarray(x).filter(ImageFilter.GaussianBlur(2))) for x in a.images]),
                    a.labels)
    inverted = score(255 - a.images, a.labels)

    assert floor["accuracy"] >= 0.75 and noise["accuracy"] <= 0.5
    assert shuffled["accuracy"] <= 0.25 and shuffled["fid"] == floor["fid"]  # labels change accuracy alone
    assert floor["fid"] * 10 < noise["fid"]
    assert floor["fid"] < blurred["fid"] and floor["fid"] < inverted["fid"]
    assert floor["kid"]["mean"] < noise["kid"]["mean"]
    assert floor["recall"] > noise["recall"]
    assert (floor["num_samples"], floor["num_reference"], floor["skipped"]) == (12, 12, {})


def test_small_sets_say_what_was_skipped_and_why(trained, heldout):
    path = trained[1]
    three = heldout.subset([0, 1, 2])
    out = ev.evaluate_samples(three, None, heldout, path, batch_size=8, cuda=False)
    assert out["fid"] is not None and out["kid"]["subset_size"] == 3
    assert out["precision"] is None and "k=3" in out["skipped"]["precision_recall"]
    assert out["accuracy"] is None and "no labels" in out["skipped"]["accuracy"]

    one = ev.evaluate_samples(heldout.subset([0]), heldout.labels[:1], heldout, path, batch_size=8, cuda=False)
    assert one["fid"] is None and "at least 2" in one["skipped"]["fid"]
    assert one["kid"] is None and "at least 2" in one["skipped"]["kid"]
    assert one["accuracy"] in (0.0, 1.0)


# Bad input ---------------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_file_that_is_not_an_evaluator_is_a_one_line_error_naming_it(tmp_path, trained, heldout):
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    with pytest.raises(SarError, match=r"notes\.pt: not a sar domain evaluator file") as err:
        ev.load_evaluator(str(text))
    _one_line(err)

    other = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, str(other))
    with pytest.raises(SarError, match=r"checkpoint\.pt: not a sar domain evaluator file") as err:
        ev.evaluate_samples(heldout, None, heldout, str(other), cuda=False)
    _one_line(err)

    with pytest.raises(SarError, match=r"missing\.pt not found") as err:
        ev.reference_images(str(tmp_path / "missing.pt"), "/nowhere")
    _one_line(err)

    # Weights that do not fit the recorded architecture.
    blob = torch.load(trained[1], weights_only=True)
    blob["meta"]["arch"]["widths"] = [16, 16, 16, 16]
    torch.save(blob, str(tmp_path / "mismatch.pt"))
    with pytest.raises(SarError, match=r"mismatch\.pt: weights do not match") as err:
        ev.load_evaluator(str(tmp_path / "mismatch.pt"))
    _one_line(err)


def test_bad_labels_images_and_settings_are_one_line_errors(tmp_path, trained, heldout, source):
    path = trained[1]
    with pytest.raises(SarError, match=r"labels: expected \(24,\) integers") as err:
        ev.evaluate_samples(heldout, heldout.labels[:5], heldout, path, cuda=False)
    _one_line(err)
    with pytest.raises(SarError, match=r"labels: values must be in \[0, 4\).*got \[0, 7\]"):
        ev.evaluate_samples(heldout, np.where(heldout.labels == 3, 7, heldout.labels), heldout, path, cuda=False)
    with pytest.raises(SarError, match=r"expected uint8 \(N, 3, H, W\) images, got torch.float32"):
        ev.create_extractor(path, cuda=False)(torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(SarError, match="holdout_fraction: 1.0 is not in"):
        domain_training.train_evaluator(source, image_size=SIZE, out_url=str(tmp_path / "x.pt"), holdout_fraction=1.0, epochs=1,
                           batch_size=4)
    with pytest.raises(SarError, match="image_size: 8 is too small"):
        domain_training.train_evaluator(source, image_size=8, out_url=str(tmp_path / "x.pt"), epochs=1, batch_size=4)
    assert not (tmp_path / "x.pt").exists()

    # A source that lost a held-out image since training: the error names the key.
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    lost = ev.read_metadata(path)["heldout_keys"][0]
    (moved / lost).unlink()
    with pytest.raises(SarError, match=rf"cannot be read \(first: {lost}") as err:
        ev.reference_images(path, str(moved))
    _one_line(err)
