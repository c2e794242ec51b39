"""The ImageNet listing and the decode/crop stage, on two-row batches without Ray."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.errors import SarError
from pipelines.data.imagenet import list_imagenet
from pipelines.data.preprocess import (
    ERROR,
    KEY,
    LABEL,
    PIXELS,
    DecodeImages,
    ReadImageBytes,
    center_crop_arr,
    decode_image,
    hflip,
    read_and_decode,
    to_model_input,
)
from pipelines.data.synth import QUIRK_KINDS, UNREADABLE_QUIRKS, make_synthetic_imagenet, render, wnid
from tests.conftest import free_port


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("quirky"))
    make_synthetic_imagenet(root, classes=3, per_class=4, size=40, seed=1, val_per_class=2, quirks=True)
    return root


# Listing ---------------------------------------------------------------------------------
def test_train_listing_labels_follow_synset_mapping(quirky):
    listing = list_imagenet(quirky, "train")
    assert listing.wnids == [wnid(i) for i in range(3)]
    assert len(listing.items) == 3 * 4 + len(QUIRK_KINDS)
    for key, label in listing.items:
        assert key.startswith(f"train/{listing.wnids[label]}/")
    assert [k for k, _ in listing.items] == sorted(k for k, _ in listing.items)


def test_labels_follow_mapping_order_not_folder_order(quirky, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(quirky, root)
    # Reverse the label order in the mapping: labels must follow the file, not sorted wnids.
    mapping = Path(root, "LOC_synset_mapping.txt")
    mapping.write_text("\n".join(reversed(mapping.read_text().splitlines())) + "\n")
    listing = list_imagenet(root, "train")
    assert listing.wnids == [wnid(2), wnid(1), wnid(0)]
    assert dict(listing.items)[f"train/{wnid(2)}/{wnid(2)}_0.JPEG"] == 0
    # Without the mapping: sorted wnids.
    os.remove(os.path.join(root, "LOC_synset_mapping.txt"))
    assert list_imagenet(root, "train").wnids == [wnid(0), wnid(1), wnid(2)]


def test_flat_val_uses_solution_csv(quirky):
    listing = list_imagenet(quirky, "val")
    assert len(listing.items) == 6
    labels = [label for _, label in listing.items]
    assert labels == [0, 0, 1, 1, 2, 2]  # the synthetic val is written class by class


def test_val_in_class_folders(quirky, tmp_path):
    root = str(tmp_path / "foldered")
    shutil.copytree(quirky, root)
    os.remove(os.path.join(root, "LOC_val_solution.csv"))
    os.makedirs(os.path.join(root, "val", wnid(1)))
    for name in sorted(os.listdir(os.path.join(root, "val"))):
        if name.endswith(".JPEG"):
            os.replace(os.path.join(root, "val", name), os.path.join(root, "val", wnid(1), name))
    listing = list_imagenet(root, "val")
    assert {label for _, label in listing.items} == {1}
    assert len(listing.items) == 6


def test_flat_val_without_csv_is_an_error(quirky, tmp_path):
    root = str(tmp_path / "nocsv")
    shutil.copytree(quirky, root)
    os.remove(os.path.join(root, "LOC_val_solution.csv"))
    with pytest.raises(SarError, match="LOC_val_solution.csv"):
        list_imagenet(root, "val")


def test_subset_is_first_classes_and_first_files(quirky):
    listing = list_imagenet(quirky, "train", classes=2, per_class=2)
    assert listing.wnids == [wnid(0), wnid(1)]
    assert len(listing.items) == 4
    full = list_imagenet(quirky, "train", classes=2, per_class=3)
    assert set(listing.keys) < set(full.keys)  # growing the subset only adds files


def test_missing_split_names_the_source(tmp_path):
    with pytest.raises(SarError, match="no train/ folder"):
        list_imagenet(str(tmp_path), "train")


# Decode and crop ---------------------------------------------------------------------------
def test_center_crop_arr_is_adm():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8))  # W 100, H 60
    out = center_crop_arr(img, 16)
    # ADM by hand: BOX halving while the short side >= 32 (60 -> 30), BICUBIC to 16, centre crop.
    small = img.resize((50, 30), Image.BOX).resize((round(50 * 16 / 30), 16), Image.BICUBIC)
    expected = np.array(small)[:, (27 - 16) // 2:(27 - 16) // 2 + 16]
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, expected)


def _batch(root, keys):
    return {KEY: np.array(keys, dtype=object), LABEL: np.arange(len(keys))}


@pytest.mark.parametrize("kind", QUIRK_KINDS)
def test_every_quirk_on_a_two_row_batch(quirky, kind):
    quirks = json.loads(Path(quirky, "_quirks.json").read_text())
    key = next(k for k, v in quirks.items() if v == kind)
    normal = f"train/{wnid(0)}/{wnid(0)}_0.JPEG"
    out = read_and_decode(_batch(quirky, [key, normal]), root=quirky, image_size=32)
    assert out[PIXELS].shape == (2, 32, 32, 3) and out[PIXELS].dtype == np.uint8
    assert out[ERROR][1] == "" and out[PIXELS][1].std() > 5  # the normal image is untouched
    if kind in UNREADABLE_QUIRKS:
        assert out[ERROR][0], f"{kind} must be rejected"
        assert (out[PIXELS][0] == 0).all()
    else:
        assert out[ERROR][0] == ""
        # The decoded RGB matches the image the quirk file was made from (JPEG loss aside).
        i = QUIRK_KINDS.index(kind)
        source = render(i % 3, 500_000 + i, 40, 1)
        if kind == "grayscale":
            source = source.convert("L")
        ref = center_crop_arr(source.convert("RGB"), 32).astype(np.float32)
        assert np.abs(out[PIXELS][0].astype(np.float32) - ref).mean() < 4.0, kind


def test_reject_reasons_name_the_problem(quirky):
    quirks = {v: k for k, v in json.loads(Path(quirky, "_quirks.json").read_text()).items()}
    out = read_and_decode(_batch(quirky, [quirks["empty"], quirks["truncated"]]), root=quirky, image_size=16)
    assert "empty" in out[ERROR][0]
    assert "runcated" in out[ERROR][1]


def test_missing_file_and_non_image_are_rejected(quirky, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.JPEG").write_text("this is not an image")
    out = read_and_decode(_batch(str(tmp_path), ["train/notes.JPEG", "train/gone.JPEG"]), root=str(tmp_path),
                          image_size=16)
    assert "UnidentifiedImageError" in out[ERROR][0]
    # The reason names the file, not PIL's in-memory buffer (`<_io.BytesIO object at 0x...>`).
    assert "train/notes.JPEG" in out[ERROR][0] and "BytesIO" not in out[ERROR][0], out[ERROR][0]
    assert out[ERROR][1] == f"read failed: not found: {tmp_path}/train/gone.JPEG"



def test_a_failing_store_stops_the_read_instead_of_rejecting_every_file(s3_bucket, tmp_path):
    """A missing bucket or an endpoint that does not answer is not the files' fault: recorded as
    rejections, the images would count as consumed and never be read again."""
    from pipelines.core import storage

    keys = ["train/n0/a.JPEG", "train/n0/b.JPEG"]
    with pytest.raises(storage.BucketNotFound, match=r"^data\.source s3://no-such-bucket-[0-9a-f]+/imagenet"):
        ReadImageBytes(f"s3://no-such-bucket-{os.getpid():x}/imagenet")(_batch("", keys))
    once = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "retries": 1,
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}}}
    with pytest.raises(storage.Unreachable, match=r"^data\.source .*cannot reach the object store at http://127"):
        ReadImageBytes(f"{s3_bucket}/imagenet", once)(_batch("", keys))
    # A missing object in a bucket that answers is a per-file problem: a rejection, the run goes on.
    out = ReadImageBytes(f"{s3_bucket}/imagenet")(_batch("", keys[:1]))
    assert out[ERROR][0] == f"read failed: not found: {s3_bucket}/imagenet/{keys[0]}"


def test_decode_stage_keeps_earlier_errors():
    batch = {KEY: np.array(["a", "b"], dtype=object), LABEL: np.array([0, 1]),
             "bytes": np.array([b"", b""], dtype=object), ERROR: np.array(["read failed: boom", ""], dtype=object)}
    out = DecodeImages(8)(batch)
    assert out[ERROR][0] == "read failed: boom" and "empty" in out[ERROR][1]


def test_read_stage_alone(quirky):
    out = ReadImageBytes(quirky)(_batch(quirky, [f"train/{wnid(1)}/{wnid(1)}_2.JPEG"]))
    assert out["bytes"][0][:2] == b"\xff\xd8" and out[ERROR][0] == ""


def test_sixteen_bit_grayscale_becomes_rgb():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and out.max() > 200 and out.min() < 60  # rescaled, not clipped


def test_model_input_range_and_flip():
    pixels = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    pixels[0, :, 0] = 255  # left column white
    x = to_model_input(pixels)
    assert x.shape == (2, 3, 4, 4) and x.min() == -1.0 and x.max() == 1.0
    f = hflip(x)
    assert (f[0, :, :, -1] == 1.0).all() and (f[0, :, :, 0] == -1.0).all()
    torch.testing.assert_close(hflip(f), x)
