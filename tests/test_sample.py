"""sar sample: per-index seeds, shard- and resume-invariant images, the chunked decode, the Ray Data
actor pool."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import sample as sample_job
from jobs.config import load_config
from jobs.stages import StageOptions
from models import Guidance, build_model
from pipelines.core import storage
from pipelines.core.errors import SarError
from pipelines.evaluate import sampling
from pipelines.train import checkpoints

CLASSES, PER_CLASS = 4, 3  # N = 12
RAW_SPACE = {"encoder": "raw", "weights": None, "weights_sha256": None, "scale_factor": None, "image_size": 32,
             "grid": [8, 8], "channels": 3, "patch": 4, "token_dim": 48, "grouping": "next-neighbour",
             "scales": None, "num_classes": CLASSES, "schema_version": 1}


def _publish_checkpoint(stage_dir: str, step: int = 10) -> str:
    """A tiny random model as a committed checkpoint (raw 32 px pixels in 4 px patches)."""
    torch.manual_seed(0)
    model = build_model("tiny", token_dim=48, height=8, width=8, num_classes=CLASSES)
    ema = {k: v * 0.9 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = {"step": step, "stage": "pretrain", "model_config": dataclasses.asdict(model.config),
            "latents": RAW_SPACE}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.write_local(tmp, {"model": model.state_dict(), "ema": ema}, meta)
        return checkpoints.publish(tmp, stage_dir, step, keep=3)


def _cfg(tmp_path, *sets: str):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"sample.per_class={PER_CLASS}", "sample.flow_steps=3",
                              "sample.batch_size=5", "sample.num_actors=1", "fid.grid_classes=3",
                              "fid.grid_per_class=2", "sample.guidance.w_z=2.0", *sets])


def settings(cfg, **changes) -> sampling.SampleSettings:
    """The sample settings of `cfg`, with some fields changed."""
    return dataclasses.replace(sample_job.settings(cfg), **changes)


@pytest.fixture
def cfg(tmp_path):
    c = _cfg(tmp_path)
    _publish_checkpoint(c.pretrain_dir)
    return c


def _png(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(url))).convert("RGB"))


def test_seeds_are_per_index_and_labels_class_major():
    plan = sampling.SamplePlan(num_classes=1000, per_class=50, seed=0)
    assert plan.size == 50_000
    rows = plan.rows([0, 49, 50, 49_999])
    assert rows["label"].tolist() == [0, 0, 1, 999]
    seeds = [sampling.sample_seed(0, i) for i in range(2000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[:3] == [sampling.sample_seed(0, i) for i in range(3)]  # a pure function of (seed, index)
    assert sampling.sample_seed(1, 0) != seeds[0]
    assert rows["seed"].tolist() == [seeds[0], seeds[49], seeds[50], sampling.sample_seed(0, 49_999)]


def test_an_image_depends_only_on_its_index(cfg):
    # The same indices rendered in one batch, in other batch sizes and in another order.
    model, codec, _ = sampling.load_generator(checkpoints.find_latest(cfg.pretrain_dir), "ema", None,
                                              torch.device("cpu"))
    guidance = Guidance(**cfg.sample.guidance.model_dump())
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    rows = plan.rows(range(6))
    whole = sampling.render(model, codec, rows["label"], rows["seed"], guidance, 3, torch.device("cpu"))
    assert whole.shape == (6, 32, 32, 3) and whole.dtype == np.uint8
    parts = {}
    for chunk in ([5, 1], [3], [0, 4, 2]):
        r = plan.rows(chunk)
        for i, image in zip(chunk, sampling.render(model, codec, r["label"], r["seed"], guidance, 3,
                                                   torch.device("cpu"))):
            parts[i] = image
    for i in range(6):
        assert np.array_equal(parts[i], whole[i]), f"index {i} changed with its batch"
    assert not np.array_equal(whole[0], whole[1])  # different seeds, different images


def _recording_decoder(codec, sizes: list[int]):
    """`codec` whose decode records how many images each call got."""
    decode = codec.decode

    def recorded(tokens):
        sizes.append(tokens.shape[0])
        return decode(tokens)

    codec.decode = recorded
    return codec


def test_chunked_decode_gives_the_images_of_one_decode(tmp_path):
    from benchmarks.sample_throughput import kl16_codec

    torch.manual_seed(0)
    sizes: list[int] = []
    codec = _recording_decoder(kl16_codec((8, 16), grid=4).eval(), sizes)  # a tiny kl16-shaped KL-VAE
    grid = 3 * torch.randn(7, 4, 4, 16)
    whole = sampling.decode_images(codec, grid)
    chunked = sampling.decode_images(codec, grid, decode_batch=3)
    assert sizes == [7, 3, 3, 1]  # one call, then the chunks: the decoder never sees more than 3
    assert whole.shape == (7, 8, 8, 3) and whole.dtype == np.uint8
    assert np.array_equal(chunked, whole)  # the same images, in the same order
    assert len({image.tobytes() for image in whole}) == 7

    # Through the sampling path: SampleSettings.decode_batch (from the config) reaches the decoder.
    settings = sampling.SampleSettings.from_config(_cfg(tmp_path, "sample.decode_batch=2").sample)
    assert settings.decode_batch == 2
    model = build_model("tiny", token_dim=16, height=4, width=4, num_classes=CLASSES).eval()
    rows = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0).rows(range(5))
    sizes.clear()
    images = settings.render(model, codec, rows, torch.device("cpu"))
    assert sizes == [2, 2, 1]  # the batch of 5 (sample.batch_size) decoded 2 at a time
    one_call = dataclasses.replace(settings, decode_batch=64).render(model, codec, rows, torch.device("cpu"))
    assert np.array_equal(images, one_call)


def test_stage_call_writes_a_two_row_batch(cfg, tmp_path):
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    out = str(tmp_path / "samples")
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    stage = sampling.SampleGenerator(ckpt, out, settings(cfg), plan)
    result = stage(plan.rows([7, 2]))
    assert result["file"].tolist() == ["images/000007.png", "images/000002.png"]
    assert result["label"].tolist() == [2, 0]
    rows = plan.rows([2])
    expected = sampling.render(stage.model, stage.codec, rows["label"], rows["seed"],
                               Guidance(**cfg.sample.guidance.model_dump()), 3, stage.device)[0]
    assert np.array_equal(_png(os.path.join(out, "images", "000002.png")), expected)
    assert sampling.done_indices(out, "png", 1000, plan.size) == {2, 7}


def test_npz_shards_hold_the_same_images(cfg, tmp_path):
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    npz = sampling.SampleGenerator(ckpt, str(tmp_path / "npz"), settings(cfg, image_format="npz", shard_size=5,
                                                                          batch_size=2), plan)
    result = npz({"shard": np.array([2])})  # the last shard: indices 10 and 11 of 12
    assert result["index"].tolist() == [10, 11] and set(result["file"]) == {"shards/00002.npz"}
    assert sampling.done_indices(str(tmp_path / "npz"), "npz", 5, plan.size) == {10, 11}
    png = sampling.SampleGenerator(ckpt, str(tmp_path / "png"), settings(cfg, batch_size=2), plan)
    png(plan.rows([10, 11]))
    entries = [{"index": i, "file": f} for i, f in zip(result["index"].tolist(), result["file"].tolist())]
    from_npz = sampling.load_images(str(tmp_path / "npz"), entries)
    assert np.array_equal(from_npz[1], _png(str(tmp_path / "png" / "images" / "000011.png")))


@pytest.mark.ray
def test_killed_job_resumes_to_exactly_n_identical_images(ray_local, cfg, tmp_path, capfd, recwarn):
    from jobs.cli import main as cli

    # What a whole run makes, rendered here in one process in batches of 5.
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    stage = sampling.SampleGenerator(checkpoints.find_latest(cfg.pretrain_dir), cfg.samples_dir, settings(cfg), plan)
    for start in range(0, plan.size, 5):
        stage(plan.rows(range(start, min(start + 5, plan.size))))
    images_dir = os.path.join(cfg.samples_dir, "images")
    first = {name: Path(images_dir, name).read_bytes() for name in os.listdir(images_dir)}
    assert len(first) == plan.size

    # The job died: half the images never written, one write torn mid-way (its temporary
    # file left behind), no index, no manifest.
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    sampling.check_spec(cfg.samples_dir, sampling.generation_spec(plan, settings(cfg), ckpt, checkpoints.read_meta(ckpt)))
    for name in sorted(first)[::2]:
        os.remove(os.path.join(images_dir, name))
    with open(os.path.join(images_dir, ".000004.png.abc123.tmp"), "wb") as f:
        f.write(b"\x89PNG torn")

    # `sar sample` resumes it on the Ray actor pool with other sharding: two actors, batches of 2.
    run_dir = str(tmp_path / "run")
    assert cli(["sample", "--set", f"run_dir={run_dir}", "--set", f"sample.per_class={PER_CLASS}",
                "--set", "sample.flow_steps=3", "--set", "sample.batch_size=2", "--set", "sample.guidance.w_z=2.0",
                "--set", "sample.num_actors=2"]) == 0
    # One progress line; nothing alarming on the way: no deprecated-argument warning from Ray Data,
    # and no error-level line from Ray core about restarting the pool's actors.
    said = capfd.readouterr().err + "".join(str(w.message) for w in recwarn)
    assert re.search(r"^sample: 6/6 images in \S+, [\d.,]+ images/s$", said, re.M), said
    assert "``concurrency`` is deprecated" not in said and "`ray_remote_args` is deprecated" not in said, said
    assert "max_restarts" not in said, said
    pngs = sorted(n for n in os.listdir(images_dir) if n.endswith(".png") and not n.startswith("."))
    assert pngs == sorted(first)
    for name in pngs:
        assert Path(images_dir, name).read_bytes() == first[name], f"{name} differs after resume"
    index = storage.read_json(os.path.join(cfg.samples_dir, sampling.INDEX_FILE))
    assert [e["index"] for e in index] == list(range(12))
    assert len({e["file"] for e in index}) == 12 and [e["label"] for e in index] == [i // PER_CLASS for i in range(12)]
    manifest = storage.read_json(os.path.join(cfg.samples_dir, sampling.MANIFEST_FILE))
    assert manifest["num_samples"] == 12 and manifest["classes"] == CLASSES and manifest["flow_steps"] == 3
    assert manifest["checkpoint_digest"] == checkpoints.read_meta(checkpoints.find_latest(cfg.pretrain_dir))["digest"]
    assert manifest["config"]["sample"]["num_actors"] == 2

    # A finished set: a re-run makes nothing and needs no Ray work.
    assert sample_job.main(cfg) == 0


def test_resume_refuses_a_set_made_differently(cfg):
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    meta = checkpoints.read_meta(ckpt)
    sampling.check_spec(cfg.samples_dir, sampling.generation_spec(plan, settings(cfg), ckpt, meta))
    cfg.sample.flow_steps = 9
    with pytest.raises(SarError, match=r"flow_steps=3.*would use 9.*sample\.output"):
        sampling.check_spec(cfg.samples_dir, sampling.generation_spec(plan, settings(cfg), ckpt, meta))
    cfg.sample.flow_steps = 3
    cfg.sample.solver = "heun"                          # another solver makes another set
    with pytest.raises(SarError, match=r"solver='euler'.*would use 'heun'"):
        sampling.check_spec(cfg.samples_dir, sampling.generation_spec(plan, settings(cfg), ckpt, meta))


def test_spec_written_before_sampler_keys_matches_the_defaults(cfg):
    """A set begun before the spec recorded solver and temperature was made with euler at 1.0."""
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    spec = sampling.generation_spec(plan, settings(cfg), ckpt, checkpoints.read_meta(ckpt))
    old = {k: v for k, v in spec.items() if k not in ("solver", "temperature")}
    storage.write_json(os.path.join(cfg.samples_dir, sampling.SPEC_FILE), old)
    sampling.check_spec(cfg.samples_dir, spec)
    with pytest.raises(SarError, match="temperature"):
        sampling.check_spec(cfg.samples_dir, {**spec, "temperature": 0.5})


def test_sampler_settings_reach_the_model(cfg):
    """sample.solver / temperature travel from the config through SampleSettings into generate."""
    cfg.sample.temperature, cfg.sample.solver = 0.0, "heun"
    sampler = sample_job.settings(cfg).sampler
    assert sampler == {"solver": "heun", "temperature": 0.0, "compile_head": False}
    model, codec, _ = sampling.load_generator(checkpoints.find_latest(cfg.pretrain_dir), "ema", None,
                                              torch.device("cpu"))
    guidance, cpu = Guidance(), torch.device("cpu")
    cold = [sampling.render(model, codec, [1], [s], guidance, 3, cpu, sampler) for s in (5, 6)]
    warm = [sampling.render(model, codec, [1], [s], guidance, 3, cpu) for s in (5, 6)]
    assert np.array_equal(cold[0], cold[1]) and not np.array_equal(warm[0], warm[1])


def test_checkpoint_choice_and_missing_checkpoint(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(SarError, match=r"no checkpoint to sample from.*sample\.checkpoint"):
        sample_job.main(cfg)
    pre = _publish_checkpoint(cfg.pretrain_dir, step=10)
    assert sample_job.checkpoint(cfg) == pre
    refined = _publish_checkpoint(cfg.refine_dir, step=5)
    assert sample_job.checkpoint(cfg) == refined  # refine wins over pretrain
    cfg.sample.checkpoint = pre
    assert sample_job.checkpoint(cfg) == pre
    cfg.sample.num_classes = CLASSES + 1
    with pytest.raises(SarError, match="trained on 4 classes"):
        sample_job.main(cfg)


def test_preview_grid_shows_the_run_s_images(cfg):
    assert sample_job.main(cfg, StageOptions(preview=True)) == 0
    grid = Image.open(os.path.join(cfg.samples_dir, sampling.PREVIEW_FILE))
    assert grid.size == (2 + 2 * 66, 2 + 3 * 66)  # 3 classes x 2 samples, 32 px shown at 64
    assert not os.path.exists(os.path.join(cfg.samples_dir, sampling.MANIFEST_FILE))
    model, codec, _ = sampling.load_generator(checkpoints.find_latest(cfg.pretrain_dir), "ema", None,
                                              torch.device("cpu"))
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    rows = plan.rows([PER_CLASS * 3 + 1])  # last row (class 3), second sample
    image = sampling.render(model, codec, rows["label"], rows["seed"],
                            Guidance(**cfg.sample.guidance.model_dump()), 3, torch.device("cpu"))[0]
    cell = np.asarray(grid)[2 + 2 * 66:2 + 2 * 66 + 64:2, 2 + 66:2 + 66 + 64:2]
    assert np.array_equal(cell, image)


def test_stage_writes_to_an_object_store_and_lists_what_is_there(cfg, s3_bucket):
    ckpt = checkpoints.find_latest(cfg.pretrain_dir)
    out = f"{s3_bucket}/samples"
    plan = sampling.SamplePlan(CLASSES, PER_CLASS, seed=0)
    stage = sampling.SampleGenerator(ckpt, out, settings(cfg), plan)
    stage(plan.rows([0, 11]))
    assert sampling.done_indices(out, "png", 1000, plan.size) == {0, 11}
    assert _png(f"{out}/images/000011.png").shape == (32, 32, 3)
