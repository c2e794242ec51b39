"""benchmarks/quality.py keeps each model it trains and loads it back instead of training again; its loss
table encodes held-out images as the training rows and tells memorised rows from unseen ones."""

import statistics
import types

import numpy as np
import pytest
import torch

from benchmarks import quality
from jobs.config import PipelineConfig
from models import SARConfig, SARModel
from pipelines.train import driver

MANIFEST = {"grid": [4, 4], "token_dim": 12, "num_classes": 3, "sources": {"digest": "abc"}}


def _trained(cfg: PipelineConfig, seed: int) -> quality.Trained:
    torch.manual_seed(seed)
    model = SARModel(SARConfig.from_dict(driver.build_model_config(cfg.model, MANIFEST))).eval()
    return quality.Trained(model, seconds=12.5, done=7)


def test_a_kept_model_is_loaded_back_not_trained_again_and_other_settings_train(tmp_path):
    cfg = PipelineConfig.model_validate({"model": {"preset": "tiny"}})
    bench = types.SimpleNamespace(args=types.SimpleNamespace(work=str(tmp_path)))
    first = quality.Bench.kept(bench, cfg, MANIFEST, ("pretrain", 0, 7), lambda: _trained(cfg, 0))
    (path,) = (tmp_path / "models").iterdir()
    assert path.name.startswith("pretrain-0-7-")

    def must_not_train():
        raise AssertionError("trained again although its weights are kept")

    again = quality.Bench.kept(bench, cfg, MANIFEST, ("pretrain", 0, 7), must_not_train)
    assert (again.seconds, again.done) == (12.5, 7)
    loaded = quality.load_kept(str(path))              # the guidance table's --weights
    for name, value in first.ema.state_dict().items():
        assert torch.equal(again.ema.state_dict()[name], value), name
        assert torch.equal(loaded.ema.state_dict()[name], value), name

    other = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"seed": 1})})
    with pytest.raises(AssertionError, match="trained again"):
        quality.Bench.kept(bench, other, MANIFEST, ("pretrain", 0, 7), must_not_train)


def test_held_out_images_are_encoded_as_sar_encode_writes_their_rows():
    from pipelines.data import latents
    from pipelines.data.codecs import make_codec
    from pipelines.data.encode import EncodeLatents
    from pipelines.data.preprocess import PIXELS
    from pipelines.evaluate.domain import LabelledImages

    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1])
    written = EncodeLatents("raw", None, 8, 2, None, "next-neighbour", None, storage_dtype="float32")(
        {latents.KEY: np.array([f"k{i}" for i in range(5)]), latents.LABEL: labels, PIXELS: pixels,
         latents.ERROR: np.array([""] * 5)})
    rows = quality.rows_of(make_codec("raw", None, 8, 2, None), LabelledImages(pixels, labels))
    assert set(rows) == {latents.LABEL, latents.MEAN, latents.MEAN_FLIP}
    for key in rows:
        np.testing.assert_allclose(rows[key], written[key], atol=1e-6, err_msg=key)


def test_the_loss_table_tells_rows_a_model_was_trained_on_from_rows_it_never_saw():
    from pipelines.data import latents
    from pipelines.train.objectives import make_objective

    torch.manual_seed(0)
    model = SARModel(SARConfig.from_dict({**driver.build_model_config(
        PipelineConfig.model_validate({"model": {"preset": "tiny"}}).model, MANIFEST), "class_dropout": 0.0}))
    rng = np.random.default_rng(0)

    def random_rows(n):
        mean = rng.standard_normal((n, 4, 4, 12)).astype(np.float32)
        return {latents.LABEL: rng.integers(0, 3, n), latents.MEAN: mean, latents.MEAN_FLIP: mean[:, :, ::-1].copy()}

    seen, unseen = random_rows(8), random_rows(8)
    assert quality.flow_loss(model, seen) == quality.flow_loss(model, seen)      # the same draws each time
    before = statistics.fmean(quality.flow_loss(model, seen)) - statistics.fmean(quality.flow_loss(model, unseen))
    objective = make_objective("pretrain", model, None)
    opt = torch.optim.Adam(objective.parameters(), lr=3e-3)
    batch = {k: torch.from_numpy(v) for k, v in seen.items()}
    for step in range(100):                                                      # memorise 8 rows of noise
        x, labels = latents.tokens_from_batch(batch, model.grouping, torch.Generator().manual_seed(step),
                                              torch.device("cpu"), hflip=False)
        opt.zero_grad()
        objective(x, labels)[0].backward()
        opt.step()
    after = statistics.fmean(quality.flow_loss(model, seen)) - statistics.fmean(quality.flow_loss(model, unseen))
    assert after < before - 0.05, (before, after)
