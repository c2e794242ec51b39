"""MAR's kl16 and other LDM-format KL-VAE checkpoints as diffusers AutoencoderKL models.

LDM (CompVis latent-diffusion) and MAR save their VAE as one state dict whose key names and
attention layers differ from diffusers'. This module reads such a file (tensors only, no
pickled code), reads the architecture off the tensors' shapes, maps every key to diffusers'
names and loads it strictly: a key left unmapped, missing or mis-shaped is an error.
"""

from __future__ import annotations

import logging
import pickle
import re
from typing import Any

import torch

from pipelines.core.errors import SarError

log = logging.getLogger(__name__)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict: .safetensors, or a torch file (tensors only, no pickled code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise SarError(
            f"encode.weights: cannot read {path} as a tensors-only torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); save its state dict with torch.save or as .safetensors"
        ) from None
    # LDM and MAR nest the weights: {"state_dict": ...} (Lightning) or {"model": ...} (MAR).
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SarError(f"encode.weights: {path} does not hold a state dict of tensors")
    return sd



_LDM_PREFIXES = ("first_stage_model.", "vae.")  # a whole LDM model, or a VAE inside a pipeline
_LDM_IGNORED = ("loss.",)  # LDM's training losses (LPIPS, discriminator): not part of the VAE


def ldm_vae_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers AutoencoderKL config of an LDM-format VAE state dict, read off its shapes.

    LDM's Encoder/Decoder (CompVis latent-diffusion, MAR's models/vae.py) have per-level
    ResNet blocks and optional self-attention at some resolutions (MAR's kl16 encoder
    attends at its last level, 16x16 for 256 px); diffusers expresses those levels as
    AttnDownEncoderBlock2D / AttnUpDecoderBlock2D.
    """
    def levels(prefix: str) -> list[int]:
        return sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        down = levels("encoder.down")
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        mults = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in down]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        embed_dim = sd["post_quant_conv.weight"].shape[0]
        double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels
        quant_in = sd["quant_conv.weight"].shape[1]
    except KeyError as err:
        raise SarError(f"encode.weights: not an LDM KL-VAE state dict: no key {err.args[0]!r}") from None
    if embed_dim != z_channels or not double_z or quant_in != 2 * z_channels:
        raise SarError(
            f"encode.weights: LDM VAE with embed_dim {embed_dim}, z_channels {z_channels}, double_z {double_z}: "
            "diffusers AutoencoderKL needs embed_dim == z_channels and a double_z encoder"
        )
    down_attn = {i for i in down if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd)}
    up_attn = {i for i in levels("decoder.up") if any(k.startswith(f"decoder.up.{i}.attn.") for k in sd)}
    n = len(down)
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in down_attn else "DownEncoderBlock2D" for i in range(n)],
        # diffusers numbers decoder blocks from the lowest resolution up; LDM the other way.
        "up_block_types": ["AttnUpDecoderBlock2D" if (n - 1 - i) in up_attn else "UpDecoderBlock2D" for i in range(n)],
        "block_out_channels": [ch * m for m in mults],
        "layers_per_block": len(blocks),
        "latent_channels": z_channels,
        "norm_num_groups": 32,  # LDM's Normalize() is always GroupNorm(32)
    }


def _convert_attention(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One LDM AttnBlock key (1x1 convs) as a diffusers Attention key (linear layers)."""
    names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    module, param = key.rsplit(".", 2)[-2:]
    if value.ndim == 4:
        value = value[:, :, 0, 0]
    return f"{names[module]}.{param}", value


def convert_ldm_vae_state_dict(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """LDM VAE keys -> diffusers AutoencoderKL keys, every key accounted for.

    diffusers' own converter (loaders.single_file_utils.convert_ldm_vae_checkpoint) maps the
    ResNets, the mid block, up/downsamplers and the quant convs; it does not know attention
    inside the down/up levels, which it passes through under their LDM names. Those are
    mapped here.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = convert_ldm_vae_checkpoint(dict(sd), config)
    n = len(config["block_out_channels"])
    for key in [k for k in out if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]:
        value = out.pop(key)
        part, level, idx = re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.", key).groups()
        name, value = _convert_attention(key, value)
        if part == "encoder.down":
            out[f"encoder.down_blocks.{level}.attentions.{idx}.{name}"] = value
        else:
            out[f"decoder.up_blocks.{n - 1 - int(level)}.attentions.{idx}.{name}"] = value
    return out


def autoencoder_kl_from_ldm(sd: dict[str, torch.Tensor], source: str = "checkpoint"):
    """A diffusers AutoencoderKL holding an LDM-format state dict; fails on any key not mapped."""
    from diffusers import AutoencoderKL

    for prefix in _LDM_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    ignored = [k for k in sd if k.startswith(_LDM_IGNORED)]
    sd = {k: v for k, v in sd.items() if not k.startswith(_LDM_IGNORED)}
    if ignored:
        log.info("%s: ignoring %d training-loss tensors (%s...)", source, len(ignored), ignored[0])
    config = ldm_vae_config(sd)
    converted = convert_ldm_vae_state_dict(sd, config)
    vae = AutoencoderKL(**config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected or len(converted) != len(sd):
        raise SarError(
            f"encode.weights: {source}: LDM -> diffusers conversion left {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unmapped keys {unexpected[:3]}, "
            f"{len(sd)} source tensors for {len(converted)} converted"
        )
    for k, v in converted.items():
        if v.shape != expected[k].shape:
            raise SarError(f"encode.weights: {source}: {k} has shape {tuple(v.shape)}, the model needs "
                           f"{tuple(expected[k].shape)}")
    vae.load_state_dict(converted, strict=True)
    return vae

