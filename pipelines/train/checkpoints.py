"""Self-describing training checkpoints, written by pretrain and refine, read by refine and sample.

A checkpoint is a folder `{stage_dir}/checkpoints/step_{N:08d}/` holding
    state.pt   model, EMA, optimizer, scheduler, step, data position, metric history
    meta.json  step, stage, model config, the dataset's token space, what the run consumed
               (`inputs`), the resolved run config, the files it commits and the sha256 of state.pt
`meta.json` is written last: a folder without it (a crash mid-save) is not a checkpoint, and
`find_latest` skips it, as it skips (with a warning) one whose meta.json does not parse or whose
state.pt is gone. The stage that owns the folder moves a corrupt checkpoint (state.pt not
matching its digest) to `checkpoints/corrupt-step_N/`, kept for inspection, and resumes from
the newest one that loads (`set_aside_corrupt`). Loading for sampling prefers the EMA weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import torch

from models import SARConfig, SARModel
from pipelines.core import storage
from pipelines.core.errors import SarError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CORRUPT_PREFIX = "corrupt-"  # checkpoints/corrupt-step_N/: set aside, never listed nor pruned
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


def meta_token_space(meta: dict[str, Any]) -> dict[str, Any]:
    """The token space a checkpoint was trained on, from its meta.json (how its samples decode)."""
    space = meta.get("latents") or meta.get("token_space")
    if not space:
        raise SarError("checkpoint meta.json has no 'latents' token space: cannot decode its samples")
    return space


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
    """URL of the newest committed checkpoint under `stage_dir` that looks loadable, or None.

    A newer one whose meta.json does not parse or whose state.pt is missing is passed over with
    a warning (once per process); its state's digest is checked only when loading, or by
    `set_aside_corrupt`.
    """
    for step in reversed(list_steps(stage_dir, storage_options)):
        url = storage.join(stage_dir, CHECKPOINTS, step_dir_name(step))
        why = problem(url, storage_options, full=False)
        if why is None:
            return url
        if url not in _WARNED:
            _WARNED.add(url)
            log.warning("skipping the checkpoint %s: %s", storage.redact(url), why)
    return None


_WARNED: set[str] = set()


def _sha256(url: str, storage_options: dict[str, Any] | None) -> str:
    if storage.is_local(url):
        with storage.translate_errors(url):
            return storage.sha256_file(url.removeprefix("file://"))
    fs, path = storage.filesystem(url, storage_options)
    h = hashlib.sha256()
    with storage.translate_errors(url, storage_options), fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(ckpt_url: str, storage_options: dict[str, Any] | None = None, full: bool = True) -> str | None:
    """Why a committed checkpoint cannot be loaded, or None: meta.json unreadable, state.pt missing,
    or (with `full`, one read of state.pt) its sha256 not meta.json's. Store failures raise."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(ckpt_url, META_FILE), storage_options))
        digest = str(meta["digest"])
    except storage.NotFound:
        return f"no {META_FILE}"
    except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{META_FILE} is not a checkpoint's (unreadable)"
    state = storage.join(ckpt_url, STATE_FILE)
    try:
        if not full:
            return None if storage.exists(state, storage_options) else f"no {STATE_FILE}"
        actual = _sha256(state, storage_options)
    except storage.NotFound:
        return f"no {STATE_FILE}"
    return None if actual == digest else f"{STATE_FILE} has sha256 {actual[:12]}, meta.json says {digest[:12]}"


def set_aside_corrupt(stage_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Move every checkpoint newer than the newest loadable one to `checkpoints/corrupt-step_N/`,
    warning for each; return the newest loadable one's URL (or None).

    Only the stage that owns `stage_dir` calls this, holding its writer lease. It reads the
    newest state.pt in full (its digest), once per launch.
    """
    root = storage.join(stage_dir, CHECKPOINTS)
    for step in reversed(list_steps(stage_dir, storage_options)):
        url = storage.join(root, step_dir_name(step))
        why = problem(url, storage_options)
        if why is None:
            return url
        dest = storage.join(root, CORRUPT_PREFIX + step_dir_name(step))
        if storage.exists(dest, storage_options):
            dest += time.strftime("-%Y%m%dT%H%M%SZ", time.gmtime())
        fs, src = storage.filesystem(url, storage_options)
        with storage.translate_errors(url, storage_options):
            fs.mv(src, storage.filesystem(dest, storage_options)[1], recursive=True)
        log.warning("checkpoint step %d is corrupt (%s): moved to %s; going on from the one before it",
                    step, why, storage.redact(dest))
    return None


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
                           f"meta.json's {str(meta.get('digest'))[:12]} (incomplete or altered checkpoint); "
                           f"re-launching its stage moves it aside and resumes from the one before")
        state = torch.load(path, map_location="cpu", weights_only=False)
    return state, meta


def model_from_meta(meta: dict[str, Any]):
    """An un-trained SARModel with the architecture recorded in `meta`."""
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
