import hashlib
import io
import json
import os

import numpy as np
from PIL import Image

from jobs.cli import main
from pipelines.data.imagenet import list_imagenet
from pipelines.data.synth import QUIRK_KINDS, make_synthetic_imagenet, wnid


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(open(p, "rb").read())
    return h.hexdigest()


def test_layout(tmp_path):
    s = make_synthetic_imagenet(str(tmp_path), classes=3, per_class=4, size=24, seed=1, val_per_class=2)
    assert (s.train_images, s.val_images) == (12, 6)
    wnids = [line.split()[0] for line in (tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert wnids == [wnid(i) for i in range(3)] == sorted(wnids)
    for w in wnids:
        files = sorted(os.listdir(tmp_path / "train" / w))
        assert files == sorted(f"{w}_{n}.JPEG" for n in range(4))
        img = Image.open(tmp_path / "train" / w / files[0])
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (24, 24)
    rows = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 7
    image_id, pred = rows[1].split(",")
    assert (tmp_path / "val" / f"{image_id}.JPEG").exists() and pred.split()[0] == wnids[0]


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    make_synthetic_imagenet(str(tmp_path / "a"), classes=2, per_class=3, size=16, seed=5)
    make_synthetic_imagenet(str(tmp_path / "b"), classes=2, per_class=3, size=16, seed=5)
    make_synthetic_imagenet(str(tmp_path / "c"), classes=2, per_class=3, size=16, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_classes_are_distinct_and_vary_within(tmp_path):
    make_synthetic_imagenet(str(tmp_path), classes=4, per_class=8, size=32, seed=0)
    means = []
    for c in range(4):
        imgs = [np.asarray(Image.open(tmp_path / "train" / wnid(c) / f"{wnid(c)}_{n}.JPEG"), np.float32)
                for n in range(8)]
        within = np.mean([np.abs(imgs[0] - im).mean() for im in imgs[1:]])
        assert within > 2.0  # images of a class are not copies
        means.append(np.stack(imgs).mean(axis=0))
    # Class-mean images differ more between classes than single images do within a class.
    between = np.mean([np.abs(means[i] - means[j]).mean() for i in range(4) for j in range(i + 1, 4)])
    assert between > 10.0


def test_quirks(tmp_path):
    s = make_synthetic_imagenet(str(tmp_path), classes=2, per_class=2, size=16, seed=0, quirks=True)
    listed = json.loads((tmp_path / "_quirks.json").read_text())
    assert sorted(listed.values()) == sorted(QUIRK_KINDS) and listed == s.quirks
    by_kind = {v: tmp_path / k for k, v in listed.items()}
    assert Image.open(by_kind["cmyk"]).mode == "CMYK"
    assert Image.open(by_kind["grayscale"]).mode == "L"
    assert Image.open(by_kind["png_named_jpeg"]).format == "PNG"
    assert by_kind["empty"].stat().st_size == 0
    try:
        Image.open(io.BytesIO(by_kind["truncated"].read_bytes())).load()
        truncated_loads = True
    except OSError:
        truncated_loads = False
    assert not truncated_loads


def test_cli(tmp_path, capsys):
    rc = main(["synth-imagenet", str(tmp_path / "d"), "--classes", "2", "--per-class", "3", "--size", "16",
               "--seed", "3", "--quirks", "--test-per-class", "2"])
    assert rc == 0
    assert "wrote 13 train, 4 val and 4 test images of 2 classes" in capsys.readouterr().out  # 6 + 7 quirks
    assert len(os.listdir(tmp_path / "d" / "train")) == 2
    test_split = list_imagenet(str(tmp_path / "d"), "test")
    assert [label for _, label in test_split.items] == [0, 0, 1, 1]  # class folders, in the mapping's order
    assert not set(test_split.keys) & set(list_imagenet(str(tmp_path / "d"), "val").keys)
    assert main(["synth-imagenet", str(tmp_path / "e"), "--classes", "0"]) == 2
