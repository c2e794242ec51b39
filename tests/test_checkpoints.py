"""Checkpoints that do not load: passed over by readers, set aside by their stage, never deleted."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from pipelines.core.errors import SarError
from pipelines.train import checkpoints as C


def _save(stage_dir: str, step: int) -> str:
    state = {"model": {"w": torch.full((2,), float(step))}, "step": step}
    return C.save(stage_dir, step, state, {"step": step, "stage": "pretrain"}, keep=5)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, caplog):
    stage = str(tmp_path / "pretrain")
    first, second = _save(stage, 4), _save(stage, 8)
    with open(os.path.join(second, C.STATE_FILE), "r+b") as f:  # bit rot, a bad copy: same name, other bytes
        f.seek(100)
        f.write(b"\0" * 16)
    with pytest.raises(SarError, match="does not match meta.json's .* moves it aside"):
        C.load_state(second)

    with caplog.at_level(logging.WARNING):
        assert C.set_aside_corrupt(stage) == first
    aside = os.path.join(stage, C.CHECKPOINTS, "corrupt-step_00000008")
    assert os.path.isfile(os.path.join(aside, C.STATE_FILE)) and not os.path.exists(second)  # kept, not deleted
    assert "checkpoint step 8 is corrupt (state.pt has sha256" in caplog.text and "corrupt-step_00000008" in caplog.text
    assert C.find_latest(stage) == first and C.list_steps(stage) == [4]
    assert C.load_state(first)[0]["step"] == 4

    # A new step 8 is written and goes bad too: the first one set aside stays as it was.
    bad_again = _save(stage, 8)
    os.remove(os.path.join(bad_again, C.STATE_FILE))
    assert C.set_aside_corrupt(stage) == first
    assert sorted(n for n in os.listdir(os.path.join(stage, C.CHECKPOINTS)) if n.startswith("corrupt-"))[0] == \
        "corrupt-step_00000008" and len(os.listdir(os.path.join(stage, C.CHECKPOINTS))) == 3


def test_readers_pass_over_a_checkpoint_whose_files_are_unreadable(tmp_path, caplog):
    stage = str(tmp_path / "refine")
    first, second = _save(stage, 2), _save(stage, 4)
    with open(os.path.join(second, C.META_FILE), "w") as f:
        f.write('{"step": 4, "dig')  # cut short
    with caplog.at_level(logging.WARNING):
        assert C.find_latest(stage) == first
    assert "meta.json is not a checkpoint's (unreadable)" in caplog.text
    assert os.path.isdir(second)  # a reader never moves anything


def test_refinement_starts_at_a_named_step_or_fraction_of_pretraining(tmp_path):
    """refine.init: the pretrain checkpoint of a step, the newest at or before a fraction of pretrain.steps,
    or (unset) the newest; a step that was not kept is an error naming the steps that were."""
    from jobs.config import load_config
    from pipelines.core import storage
    from pipelines.data.latents import MANIFEST, SCHEMA_VERSION
    from pipelines.train.driver import refine_start

    run = tmp_path / "run"
    for step in (50, 90, 100):
        _save(str(run / "pretrain"), step)
    storage.write_json(str(run / "latents" / MANIFEST), {"schema_version": SCHEMA_VERSION, "num_rows": 640})

    def start(init):
        cfg = load_config(None, [f"run_dir={run}", "pretrain.steps=100", *([f"refine.init={init}"] if init else [])])
        return refine_start(cfg)

    assert start(None).endswith("step_00000100") and start("90").endswith("step_00000090")
    assert start("0.9").endswith("step_00000090") and start("0.95").endswith("step_00000090")
    assert start("0.6").endswith("step_00000050")
    with pytest.raises(SarError, match=r"refine.init 70: no pretrain checkpoint at step 70 .* holds steps \[50, 90, 100\]"):
        start("70")
    with pytest.raises(SarError, match=r"no pretrain checkpoint at or before step 40 \(0.4 of 100\)"):
        start("0.4")
