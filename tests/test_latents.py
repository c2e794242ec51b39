"""The latents format without Ray: shards, the commit protocol, compatibility checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.core.errors import DatasetMismatch, SarError
from pipelines.data import latents as L
from pipelines.data.latents import ERROR, KEY, LABEL

HEADER = {"schema_version": L.SCHEMA_VERSION, "encoder": "raw", "weights_sha256": None, "scale_factor": 1.0,
          "image_size": 8, "grid": [2, 2], "channels": 3, "patch": 4, "token_dim": 48, "grouping": "next-row",
          "scales": None, "dtype": "float16", "columns": {}, "split": "train", "classes": ["n1", "n2"]}


def _batch(keys, errors=None, seed=0):
    n = len(keys)
    rng = np.random.default_rng(seed)
    return {KEY: np.array(keys, dtype=object), LABEL: np.arange(n) % 2,
            ERROR: np.array(errors or [""] * n, dtype=object),
            L.MEAN: rng.standard_normal((n, 2, 2, 48)).astype(np.float16),
            L.MEAN_FLIP: rng.standard_normal((n, 2, 2, 48)).astype(np.float16),
            L.TOKENS: rng.standard_normal((n, 4, 48)).astype(np.float16)}


def _write(tmp, keys, errors=None, run="r1"):
    out = L.write_shard(_batch(keys, errors), latents_url=str(tmp), run_id=run)
    return {k: v[0] for k, v in out.items()}


def test_write_shard_keeps_good_rows_and_reports_rejects(tmp_path):
    batch = _batch(["a", "b", "c"], ["", "truncated", ""])
    res = {k: v[0] for k, v in L.write_shard(batch, latents_url=str(tmp_path), run_id="r1").items()}
    assert res["rows"] == 2 and json.loads(res["keys"]) == ["a", "c"]
    assert json.loads(res["rejected"]) == [{"key": "b", "reason": "truncated"}]
    table = pq.read_table(tmp_path / res["file"])
    assert table.column(KEY).to_pylist() == ["a", "c"]
    mean = table.column(L.MEAN).chunk(0).to_numpy()
    assert mean.shape == (2, 2, 2, 48) and mean.dtype == np.float16
    np.testing.assert_array_equal(mean, batch[L.MEAN][[0, 2]])
    assert os.path.getsize(tmp_path / res["file"]) == res["bytes"]


def test_all_rejected_batch_writes_no_file(tmp_path):
    res = _write(tmp_path, ["a"], ["empty file (0 bytes)"])
    assert res["file"] == "" and res["rows"] == 0 and os.listdir(tmp_path) == []


def test_commit_then_state_round_trip(tmp_path):
    c = L.Committer(str(tmp_path), HEADER, None, set(), [])
    c.add(_write(tmp_path, ["a", "b"], ["", "bad"]))
    c.add(_write(tmp_path, ["c"]))
    manifest = c.commit()
    assert manifest["num_rows"] == 2 and manifest["num_rejected"] == 1 and len(manifest["shards"]) == 2
    assert manifest["rejected"] == [{"key": "b", "reason": "bad"}]
    assert manifest["sources"]["count"] == 3 and manifest["sources"]["digest"] == L.keys_digest(["a", "b", "c"])
    previous, consumed, rejected = L.committed_state(str(tmp_path))
    assert previous == L.read_manifest(str(tmp_path)) and consumed == {"a", "b", "c"} and len(rejected) == 1


def test_interrupted_commit_rebuilds_keys_from_shards(tmp_path):
    c = L.Committer(str(tmp_path), HEADER, None, set(), [])
    c.add(_write(tmp_path, ["a", "b"]))
    c.commit()
    # A later commit wrote its sidecar, then died before the manifest: the sidecar lies.
    c.add(_write(tmp_path, ["c"]))
    (tmp_path / L.SOURCES).write_text(json.dumps({"digest": "stale", "keys": ["a", "b", "c"]}))
    manifest, consumed, _ = L.committed_state(str(tmp_path))
    assert consumed == {"a", "b"}  # c's shard is not committed: it will be encoded again
    orphans = L.remove_orphans(str(tmp_path), manifest)
    assert len(orphans) == 1 and len(os.listdir(tmp_path)) == 1 + 2  # a shard, manifest, sidecar


def test_many_rejects_go_to_a_sidecar(tmp_path):
    n = L.INLINE_REJECTED_MAX + 1
    c = L.Committer(str(tmp_path), HEADER, None, set(), [])
    c.add(_write(tmp_path, [f"k{i}" for i in range(n)], ["bad"] * n))
    manifest = c.commit()
    assert manifest["num_rejected"] == n and manifest["rejected"]["count"] == n
    assert manifest["rejected"]["file"] == L.REJECTED
    _, consumed, rejected = L.committed_state(str(tmp_path))
    assert len(rejected) == n and len(consumed) == n


def test_remove_dataset_leaves_other_files(tmp_path):
    c = L.Committer(str(tmp_path), HEADER, None, set(), [])
    c.add(_write(tmp_path, ["a"]))
    c.commit()
    (tmp_path / "README.txt").write_text("keep me")
    L.remove_dataset(str(tmp_path))
    assert os.listdir(tmp_path) == ["README.txt"]


def test_read_manifest_names_the_url(tmp_path):
    with pytest.raises(SarError, match=str(tmp_path)):
        L.read_manifest(str(tmp_path / "nothing"))


def test_check_compatible_names_field_and_values():
    m = {"token_dim": 48, "grid": [8, 8], "grouping": "next-neighbour", "scales": None}
    L.check_compatible(m, token_dim=48, grid=(8, 8), grouping="next-neighbour", scales=None)
    with pytest.raises(DatasetMismatch, match="token_dim: dataset has 48, model expects 16"):
        L.check_compatible(m, token_dim=16, grid=(8, 8), grouping="next-neighbour", scales=None)
    with pytest.raises(DatasetMismatch, match=r"grid: dataset has \[8, 8\], model expects \[16, 16\]"):
        L.check_compatible(m, token_dim=48, grid=(16, 16), grouping="next-neighbour", scales=None)
    with pytest.raises(DatasetMismatch, match="grouping: dataset has next-neighbour, model expects next-row"):
        L.check_compatible(m, token_dim=48, grid=(8, 8), grouping="next-row", scales=None)
    with pytest.raises(DatasetMismatch, match=r"scales: dataset has none, model expects \[1, 2, 4, 8\]"):
        L.check_compatible(m, token_dim=48, grid=(8, 8), grouping="next-neighbour", scales=[1, 2, 4, 8])


def test_scale_schedule_names_resolve_to_the_manifest_sides():
    """encode writes a named schedule as its sides; check_compatible resolves the model's name."""
    from pipelines.data.encode import resolved_scales

    var10 = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert resolved_scales("var-10", 16) == var10 and resolved_scales(None, 16) is None
    with pytest.raises(SarError, match="model.scales: unknown scale schedule"):
        resolved_scales("var-11", 16)
    m = {"token_dim": 16, "grid": [16, 16], "grouping": "next-scale", "scales": var10}
    L.check_compatible(m, token_dim=16, grid=(16, 16), grouping="next-scale", scales="var-10")
    with pytest.raises(DatasetMismatch, match=r"scales: dataset has \[1, 2, 3, .*model expects \[1, 2, 4, 8, 16\]"):
        L.check_compatible(m, token_dim=16, grid=(16, 16), grouping="next-scale", scales="powers-of-two")


def test_header_mismatch_and_growing_classes():
    assert L.header_mismatch(HEADER, dict(HEADER)) is None
    assert "encoder: dataset has raw, this run makes kl-vae" in L.header_mismatch(HEADER, dict(HEADER, encoder="kl-vae"))
    assert L.header_mismatch(HEADER, dict(HEADER, classes=["n1", "n2", "n3"])) is None  # more classes: fine
    assert "classes" in L.header_mismatch(HEADER, dict(HEADER, classes=["n2", "n1"]))


def test_bfloat16_bits_round_trip():
    x = torch.randn(3, 4)
    bits = L.storage_array(x, "bfloat16")
    assert bits.dtype == np.uint16
    torch.testing.assert_close(L.column_values(torch.from_numpy(bits)), x.to(torch.bfloat16).float())
    half = L.column_values(torch.from_numpy(L.storage_array(x, "float16")))
    assert half.dtype == torch.float32 and torch.allclose(half, x, atol=1e-3)
