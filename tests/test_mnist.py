"""`sar mnist`: the 5,000 packaged MNIST digits as fixed, disjoint train / val / test splits."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipelines.data.imagenet import list_imagenet
from pipelines.data.mnist import load_digits


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist")
    assert main(["mnist", str(out)]) == 0
    return str(out)


def test_splits_are_fixed_disjoint_and_balanced(mnist, tmp_path):
    keys = {split: list_imagenet(mnist, split).keys for split in ("train", "val", "test")}
    assert {s: len(k) for s, k in keys.items()} == {"train": 4000, "val": 500, "test": 500}
    ids = {s: {os.path.basename(k) for k in ks} for s, ks in keys.items()}  # each file is named for its digit
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    labels = [label for _, label in list_imagenet(mnist, "test").items]
    assert np.bincount(labels).tolist() == [50] * 10
    # The same seed cuts the same splits on any machine; another seed, others.
    def test_ids(*args):
        out = str(tmp_path / "-".join(args))
        assert main(["mnist", out, "--split", "0,0,20", *args]) == 0
        return {os.path.basename(k) for k in list_imagenet(out, "test").keys}

    assert test_ids("--seed", "0") == test_ids("--seed", "0", "--size", "32") != test_ids("--seed", "1")


def test_digits_are_padded_not_resampled(mnist):
    digits, labels = load_digits()
    key = list_imagenet(mnist, "val").keys[7]
    index, label = int(os.path.basename(key).split("_")[1].split(".")[0]), int(os.path.basename(key)[0])
    image = np.asarray(Image.open(os.path.join(mnist, key)))
    assert image.shape == (32, 32, 3) and labels[index] == label
    assert np.array_equal(image[2:30, 2:30, 0], digits[index]) and not image[:2].any() and not image[:, 30:].any()
    assert np.array_equal(image[..., 0], image[..., 2])  # grey in three channels


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["mnist", str(tmp_path / "x"), "--size", "31"]) == 2
    assert capsys.readouterr().err == "sar mnist: error: mnist size 31: must be 28 plus an even number of pixels\n"
    assert main(["mnist", str(tmp_path / "x"), "--split", "400,50,51"]) == 2
    assert "class 0 has 500 images, the split asks for 501" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")  # every class is checked before anything is written
    assert main(["mnist", str(tmp_path / "x"), "--split", "a,b"]) == 2
    assert "three whole numbers" in capsys.readouterr().err
