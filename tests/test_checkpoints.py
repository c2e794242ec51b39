"""Checkpoints that do not load: passed over by readers, set aside by their stage, never deleted."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from pipelines.train import checkpoints as C
from pipelines.core.errors import SarError


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
