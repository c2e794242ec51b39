"""`sar encode` end to end on the session's local Ray: quirks, re-runs, a killed run, S3."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.config import load_config
from jobs.encode import job
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.data import latents as L
from pipelines.data.codecs import patchify, unpatchify
from pipelines.data.encode import run_encode
from pipelines.data.preprocess import decode_image, hflip, to_model_input
from pipelines.data.synth import UNREADABLE_QUIRKS, make_synthetic_imagenet

pytestmark = pytest.mark.ray


def _cfg(run_dir, source, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"data.source={source}", "encode.encoder=raw", "encode.image_size=16",
        "encode.patch=4", "encode.shard_rows=8", "encode.batch_size=8", "encode.storage_dtype=float32",
        "model.grouping=next-row", "cluster.num_cpus=2", *extra,
    ])


def _rows(latents_url, storage_options=None):
    ds, manifest = L.open_latents(latents_url, storage_options)
    return ds.take_all(), manifest


def _shard_files(latents_dir):
    return sorted(n for n in os.listdir(latents_dir) if n.endswith(".parquet"))


def test_quirks_idempotent_incremental_force(ray_local, tmp_path, capsys):
    root = str(tmp_path / "imagenet")
    make_synthetic_imagenet(root, classes=3, per_class=4, size=24, seed=0, quirks=True)
    quirks = json.loads(Path(root, "_quirks.json").read_text())
    bad = {k for k, kind in quirks.items() if kind in UNREADABLE_QUIRKS}
    cfg = _cfg(tmp_path / "run", root, "model.scales=[1,2,4]")

    first = run_encode(job(cfg), commit_interval_s=0)
    assert (first.rows_written, first.rejected, first.new_sources) == (12 + 5, 2, 19)
    assert first.images_per_s > 0 and first.bytes_written > 0 and "rejected 2" in first.line()
    rows, manifest = _rows(cfg.latents_dir)
    first_shards = manifest["shards"]
    assert manifest["num_rows"] == 17 and manifest["num_rejected"] == 2
    assert {r["key"] for r in manifest["rejected"]} == bad
    assert manifest["grid"] == [4, 4] and manifest["token_dim"] == 48 and manifest["scales"] == [1, 2, 4]
    assert manifest["config"]["encode"]["encoder"] == "raw" and manifest["sources"]["count"] == 19
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 17 and not (set(keys) & bad)
    assert set(quirks) - bad <= set(keys)  # CMYK, grayscale, PNG/GIF named .JPEG, RGBA: all encoded

    # A stored row is the image's tokens; mean_flip those of its mirror image.
    row = next(r for r in rows if r["key"].endswith("quirk_cmyk.JPEG"))
    x = to_model_input(torch.from_numpy(decode_image(Path(root, row["key"]).read_bytes(), 16)[None]))
    torch.testing.assert_close(torch.from_numpy(np.array(row["mean"]))[None], patchify(x, 4))
    torch.testing.assert_close(unpatchify(torch.from_numpy(np.array(row["mean_flip"]))[None], 4, 3), hflip(x))
    assert row["pyramid"].shape == (21, 48) and row["tokens"].shape == (16, 48)
    assert row["label"] == manifest["classes"].index(row["key"].split("/")[1])

    # Unchanged source: nothing is added, the manifest is not rewritten.
    before = Path(cfg.latents_dir, L.MANIFEST).read_text()
    again = run_encode(job(cfg), commit_interval_s=0)
    assert again.new_sources == 0 and again.rows_written == 0 and "up to date" in again.line()
    assert Path(cfg.latents_dir, L.MANIFEST).read_text() == before

    # A grown source: only the new files are encoded, into new shards.
    old_shards = set(_shard_files(cfg.latents_dir))
    make_synthetic_imagenet(root, classes=3, per_class=6, size=24, seed=0, quirks=True)
    grown = run_encode(job(cfg), commit_interval_s=0)
    assert (grown.new_sources, grown.rows_written, grown.rejected, grown.total_rows) == (6, 6, 0, 23)
    assert old_shards < set(_shard_files(cfg.latents_dir))
    rows, manifest = _rows(cfg.latents_dir)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 23 and manifest["num_rejected"] == 2

    # A different token space in the same folder is refused...
    with pytest.raises(SarError, match="patch: dataset has 4, this run makes 8.*--force"):
        run_encode(job(_cfg(tmp_path / "run", root, "encode.patch=8")))
    # ...unless --force, here through the command line: everything is encoded again.
    from jobs.cli import main

    argv = ["encode", "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.source={root}",
            "--set", "encode.encoder=raw", "--set", "encode.image_size=16", "--set", "encode.patch=8",
            "--set", "model.grouping=next-row", "--force"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "wrote 23 rows" in out and "rejected 2" in out and "images/s" in out and "MB" in out
    assert re.search(r"^encode: 25/25 images in \S+, [\d.,]+ images/s$", err, re.M), err  # the progress line
    manifest = L.read_manifest(cfg.latents_dir)
    assert manifest["patch"] == 8 and manifest["num_rows"] == 23 and manifest["scales"] is None
    assert not set(_shard_files(cfg.latents_dir)) & {s["file"] for s in first_shards}


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_exactly_once(ray_local, tmp_path):
    root = str(tmp_path / "imagenet")
    make_synthetic_imagenet(root, classes=2, per_class=8, size=16, seed=3, val_per_class=0)
    cfg = _cfg(tmp_path / "run", root, "encode.shard_rows=4", "encode.batch_size=4")

    def crash_after_first_commit(manifest):
        raise Crash(f"killed after {len(manifest['shards'])} shards")

    with pytest.raises(Crash):
        run_encode(job(cfg), commit_interval_s=0, on_commit=crash_after_first_commit)
    committed = L.read_manifest(cfg.latents_dir)
    assert committed["num_rows"] == 4 and len(committed["shards"]) == 1
    # What a kill leaves besides: a shard written but never committed, a half-written temporary.
    shutil.copy(os.path.join(cfg.latents_dir, committed["shards"][0]["file"]),
                os.path.join(cfg.latents_dir, "part-killed-000000000000.parquet"))
    Path(cfg.latents_dir, ".part-killed-1.parquet.x1.tmp").write_bytes(b"half")

    resumed = run_encode(job(cfg), commit_interval_s=0)
    assert (resumed.new_sources, resumed.rows_written, resumed.total_rows) == (12, 12, 16)
    rows, manifest = _rows(cfg.latents_dir)
    keys = sorted(r["key"] for r in rows)
    assert keys == sorted(set(keys)) and len(keys) == 16  # every image exactly once
    # Nothing but the committed shards remains.
    assert _shard_files(cfg.latents_dir) == sorted(s["file"] for s in manifest["shards"])
    assert not [n for n in os.listdir(cfg.latents_dir) if n.endswith(".tmp")]


def test_object_storage_in_and_out_with_vae_weights(ray_local, s3_bucket, tmp_path):
    from diffusers import AutoencoderKL

    root = tmp_path / "imagenet"
    make_synthetic_imagenet(str(root), classes=2, per_class=3, size=16, seed=5, val_per_class=0)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(root) + "/", f"{s3_bucket}/imagenet/", recursive=True)
    fs.put(str(tmp_path / "vae") + "/", f"{s3_bucket}/weights/vae/", recursive=True)

    cfg = _cfg(f"{s3_bucket}/run", f"{s3_bucket}/imagenet", "encode.encoder=kl-vae", "encode.patch=2",
               f"encode.weights={s3_bucket}/weights/vae", "encode.storage_dtype=float16")
    summary = run_encode(job(cfg), commit_interval_s=0)
    assert (summary.rows_written, summary.rejected) == (6, 0)
    rows, manifest = _rows(f"{s3_bucket}/run/latents")
    assert manifest["encoder"] == "kl-vae" and manifest["grid"] == [4, 4] and manifest["token_dim"] == 16
    assert manifest["scale_factor"] == pytest.approx(vae.config.scaling_factor)
    assert len(manifest["weights_sha256"]) == 64
    assert sorted(r["key"] for r in rows) == sorted(f"train/{p.parent.name}/{p.name}"
                                                   for p in root.glob("train/*/*.JPEG"))
    assert rows[0]["logvar"].shape == (4, 4, 16) and rows[0]["mean"].dtype == np.float16
    assert storage.exists(f"{s3_bucket}/run/latents/_sources.json")
    assert run_encode(job(cfg), commit_interval_s=0).new_sources == 0


def test_a_missing_shard_is_repaired_not_trusted(ray_local, tmp_path, caplog):
    from jobs import encode

    root = str(tmp_path / "imagenet")
    make_synthetic_imagenet(root, classes=2, per_class=4, size=16, seed=4, val_per_class=0)
    cfg = _cfg(tmp_path / "run", root, "encode.shard_rows=4", "encode.batch_size=4")
    run_encode(job(cfg), commit_interval_s=0)
    shards = L.read_manifest(cfg.latents_dir)["shards"]
    assert len(shards) == 2 and encode.status(cfg).up_to_date
    gone = shards[0]["file"]
    os.remove(os.path.join(cfg.latents_dir, gone))

    # The manifest still lists it: not up to date, and the re-run encodes exactly its images again.
    status = encode.status(cfg)
    assert not status.up_to_date and status.reason == "1 shards missing"
    again = run_encode(job(cfg), commit_interval_s=0)
    assert (again.new_sources, again.rows_written, again.total_rows) == (shards[0]["rows"], shards[0]["rows"], 8)
    assert "1 of the 2 shards that" in caplog.text and gone in caplog.text
    rows, manifest = _rows(cfg.latents_dir)
    assert gone not in {s["file"] for s in manifest["shards"]} and L.MISSING_SHARDS not in manifest
    assert all(os.path.exists(os.path.join(cfg.latents_dir, s["file"])) for s in manifest["shards"])
    assert sorted(r["key"] for r in rows) == sorted(L.committed_state(cfg.latents_dir)[1])
    assert len(rows) == 8 and encode.status(cfg).up_to_date
