"""Self-describing training checkpoints, written by pretrain and refine, read by refine and sample.

A checkpoint is a folder `{stage_dir}/checkpoints/step_{N:08d}/` holding
    state.pt   model, EMA, optimizer, scheduler, step, data position, metric history
    meta.json  step, stage, model config, the dataset's token space, what the run consumed
               (`inputs`), the resolved run config, the files it commits and the sha256 of state.pt
`meta.json` is written last: a folder without it (a crash mid-save) is not a checkpoint, and
`find_latest` skips it. Loading for sampling prefers the EMA weights.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import torch

from pipelines import storage
from pipelines.errors import SarError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

# The manifest fields a model's token space is defined by; saved with every checkpoint so a
# checkpoint can be decoded (sample) and checked against a dataset (refine) on its own.
TOKEN_SPACE_FIELDS = ("encoder", "weights", "weights_sha256", "scale_factor", "image_size", "grid",
                      "channels", "patch", "token_dim", "grouping", "scales", "num_classes", "schema_version", "columns")


def token_space(manifest: dict[str, Any]) -> dict[str, Any]:
    """The token-space fields of a latents manifest."""
    return {k: manifest[k] for k in TOKEN_SPACE_FIELDS if k in manifest}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_local(local_dir: str, state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write state.pt then meta.json (with the state's digest) into `local_dir`."""
    os.makedirs(local_dir, exist_ok=True)
    torch.save(state, os.path.join(local_dir, STATE_FILE))
    meta = {**meta, "files": [STATE_FILE], "digest": storage.sha256_file(os.path.join(local_dir, STATE_FILE))}
    with open(os.path.join(local_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)
    return local_dir


def publish(local_dir: str, stage_dir: str, step: int, keep: int,
            storage_options: dict[str, Any] | None = None) -> str:
    """Copy a written checkpoint to `{stage_dir}/checkpoints/step_N` (meta.json last), prune old ones."""
    url = storage.join(stage_dir, CHECKPOINTS, step_dir_name(step))
    for name in sorted(os.listdir(local_dir), key=lambda n: n == META_FILE):  # meta.json last
        with open(os.path.join(local_dir, name), "rb") as f, storage.open_atomic(
            storage.join(url, name), "wb", storage_options
        ) as out:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                out.write(chunk)
    for old in list_steps(stage_dir, storage_options)[:-keep]:
        storage.remove(storage.join(stage_dir, CHECKPOINTS, step_dir_name(old)), True, storage_options)
    return url


def save(stage_dir: str, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int,
         storage_options: dict[str, Any] | None = None) -> str:
    """Write a checkpoint locally, then publish it under `stage_dir`; returns its URL."""
    with tempfile.TemporaryDirectory(prefix="sar-save-") as tmp:
        write_local(tmp, state, meta)
        return publish(tmp, stage_dir, step, keep, storage_options)


def list_steps(stage_dir: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """Steps of the committed checkpoints under `stage_dir`, ascending."""
    root = storage.join(stage_dir, CHECKPOINTS)
    steps = []
    for name in storage.listdir(root, storage_options):
        m = _STEP_DIR.match(name)
        if m and storage.exists(storage.join(root, name, META_FILE), storage_options):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_latest(stage_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """URL of the newest committed checkpoint under `stage_dir`, or None."""
    steps = list_steps(stage_dir, storage_options)
    return storage.join(stage_dir, CHECKPOINTS, step_dir_name(steps[-1])) if steps else None


def read_meta(ckpt_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return storage.read_json(storage.join(ckpt_url, META_FILE), storage_options)
    except storage.NotFound:
        raise SarError(f"not a checkpoint (no {META_FILE}): {storage.redact(ckpt_url)}") from None


def latest_digest(stage_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The state digest of the newest checkpoint under `stage_dir` (what a later stage consumed)."""
    latest = find_latest(stage_dir, storage_options)
    return read_meta(latest, storage_options)["digest"] if latest else None


def load_state(ckpt_url: str, storage_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint; the state's digest is checked against meta.json."""
    meta = read_meta(ckpt_url, storage_options)
    with tempfile.TemporaryDirectory(prefix="sar-ckpt-") as tmp:
        path = os.path.join(tmp, STATE_FILE)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(storage.join(ckpt_url, STATE_FILE), storage_options))
        digest = storage.sha256_file(path)
        if digest != meta.get("digest"):
            raise SarError(f"{storage.redact(ckpt_url)}/{STATE_FILE}: sha256 {digest[:12]} does not match "
                           f"meta.json's {str(meta.get('digest'))[:12]} (incomplete or altered checkpoint)")
        state = torch.load(path, map_location="cpu", weights_only=False)
    return state, meta


def model_from_meta(meta: dict[str, Any]):
    """An un-trained SARModel with the architecture recorded in `meta`."""
    from models import SARConfig, SARModel

    try:
        return SARModel(SARConfig.from_dict(meta["model_config"]))
    except ValueError as err:
        raise SarError(f"checkpoint meta.json model_config: {err}") from None


def load_model(ckpt_url: str, weights: str = "ema", storage_options: dict[str, Any] | None = None):
    """(model in eval mode on CPU, meta) from a checkpoint; `weights` is 'ema' or 'raw'."""
    if weights not in ("ema", "raw"):
        raise SarError(f"weights must be 'ema' or 'raw', got {weights!r}")
    state, meta = load_state(ckpt_url, storage_options)
    model = model_from_meta(meta)
    key = "ema" if weights == "ema" and state.get("ema") is not None else "model"
    model.load_state_dict(state[key])
    meta = {**meta, "weights_loaded": key}
    return model.eval(), meta
