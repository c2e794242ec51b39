"""benchmarks/quality.py keeps each model it trains and loads it back instead of training again."""

import types

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
