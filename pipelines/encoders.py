"""Token spaces: images <-> grids of continuous tokens, and the Ray Data stage that encodes.

A codec turns images (B, 3, H, W) in [-1, 1] into token grids (B, h, w, D) and back
(DESIGN 2, paper Table 3):

    raw     patchified pixels, patch 16 by default: 768-dim tokens, no weights.
    kl-vae  a KL autoencoder (diffusers AutoencoderKL), from a diffusers folder or from one
            LDM-format checkpoint such as MAR's kl16 (stride 16, 16 channels, patch 1).
    wan     Wan 2.1's image-video VAE (diffusers AutoencoderKLWan), an image as a one-frame
            video (stride 8, 16 channels, patch 2: 64-dim tokens).

The latent is normalised before patchifying: z' = (z - shift) * scale, where scale is
`encode.scale_factor` or the VAE config's `scaling_factor` (Wan: per-channel
(z - latents_mean) / latents_std from its config, times `encode.scale_factor` or 1). The
stored log-variance is that of z', logvar + 2 log(scale), so a posterior sample
z' = mean + exp(logvar / 2) * eps lives directly in token space (MAR: sample, then x 0.2325).
Tokens are patchified as MAR does: each token holds its (channel, dy, dx) values.

Weights are read from a local or object-store path (storage.local_copy), never a hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines import storage
from pipelines.errors import DatasetMismatch, SarError
from pipelines.preprocess import ERROR, KEY, LABEL, PIXELS, hflip, to_model_input

log = logging.getLogger(__name__)

ENCODERS = ("raw", "kl-vae", "wan")
DEFAULT_PATCH = {"raw": 16, "kl-vae": 1, "wan": 2}  # paper Table 3: 16x16 tokens at 256 px


# Patchify (MAR's layout) -----------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/p, C*p*p), each token ordered (channel, dy, dx) as MAR."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(B, H // p, W // p, C * p * p)


def unpatchify(t: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, h, w, C*p*p) -> (B, C, h*p, w*p), the inverse of `patchify`."""
    B, h, w, _ = t.shape
    t = t.reshape(B, h, w, channels, p, p)
    return torch.einsum("nhwcpq->nchpwq", t).reshape(B, channels, h * p, w * p)


# Weights ---------------------------------------------------------------------------------
def weights_sha256(path: str) -> str:
    """SHA-256 of a weights file, or of a folder's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        names = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
        for name in names:
            h.update(name.replace(os.sep, "/").encode() + b"\0")
            h.update(storage.sha256_file(os.path.join(path, name)).encode())
        return h.hexdigest()
    return storage.sha256_file(path)


def _local_weights(url: str, storage_options: dict | None) -> str:
    try:
        return storage.local_copy(url, storage_options)
    except storage.NotFound:
        raise SarError(f"encode.weights: not found: {storage.redact(url)}") from None


def _diffusers_folder(path: str) -> str:
    """The folder holding config.json: the path itself, or its `vae/` (a pipeline folder)."""
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise SarError(f"encode.weights: {path} has no config.json (nor vae/config.json): not a diffusers folder")


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


# LDM checkpoint -> diffusers AutoencoderKL -------------------------------------------------
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


# Codecs ----------------------------------------------------------------------------------
class Codec(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> token grids (B, h, w, D); subclasses give the latent."""

    def __init__(self, name: str, image_size: int, channels: int, stride: int, patch: int,
                 shift: torch.Tensor, scale: torch.Tensor, scale_factor: float, weights_sha256: str | None):
        super().__init__()
        if image_size % (stride * patch):
            raise SarError(f"encode.image_size: {image_size} is not a multiple of the {name} encoder's "
                           f"stride {stride} x patch {patch}")
        self.name, self.image_size, self.channels, self.patch = name, image_size, channels, patch
        self.stride, self.scale_factor, self.weights_sha256 = stride, float(scale_factor), weights_sha256
        side = image_size // (stride * patch)
        self.grid = (side, side)
        self.token_dim = channels * patch * patch
        # Per-channel normalisation z' = (z - shift) * scale, as buffers so .to(device) moves them.
        self.register_buffer("latent_shift", shift.float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("latent_scale", scale.float().view(1, -1, 1, 1), persistent=False)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent's posterior mean and log-variance, (B, C, H/stride, W/stride)."""
        raise NotImplementedError

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) in [-1, 1] -> mean (B, h, w, D) and logvar (B, h, w, D) or None."""
        mean, logvar = self.moments(images)
        mean = (mean.float() - self.latent_shift) * self.latent_scale
        mean = patchify(mean, self.patch)
        if logvar is not None:
            # Var(scale * z) = scale^2 Var(z).
            logvar = patchify(logvar.float() + 2.0 * torch.log(self.latent_scale), self.patch)
        return mean, logvar

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) token grid -> (B, 3, H, W) images in [-1, 1]."""
        z = unpatchify(tokens.float(), self.patch, self.channels)
        z = z / self.latent_scale + self.latent_shift
        return self.decode_latent(z).float().clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return (f"{self.name}, image {self.image_size}, grid {self.grid}, token_dim {self.token_dim}, "
                f"patch {self.patch}, scale {self.scale_factor:g}")


class RawCodec(Codec):
    """Raw RGB patches (paper Table 3's pixel space): no weights, scale 1."""

    def __init__(self, image_size: int, patch: int):
        super().__init__("raw", image_size, 3, 1, patch, torch.zeros(3), torch.ones(3), 1.0, None)

    def moments(self, images):
        return images, None

    def decode_latent(self, z):
        return z


class KLVAECodec(Codec):
    """A diffusers AutoencoderKL (SD-style VAE, or MAR's kl16 converted from LDM format)."""

    def __init__(self, vae, image_size: int, patch: int, scale_factor: float, sha: str | None):
        cfg = vae.config
        shift = float(getattr(cfg, "shift_factor", None) or 0.0)  # SD3/Flux VAEs shift, then scale
        c = cfg.latent_channels
        super().__init__("kl-vae", image_size, c, 2 ** (len(cfg.block_out_channels) - 1), patch,
                         torch.full((c,), shift), torch.full((c,), scale_factor), scale_factor, sha)
        self.vae = vae.eval().requires_grad_(False)

    def moments(self, images):
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def decode_latent(self, z):
        return self.vae.decode(z.to(self.vae.dtype)).sample


class WanCodec(Codec):
    """Wan 2.1's VAE: an image is a one-frame video; latents normalised per channel as Wan does."""

    def __init__(self, vae, image_size: int, patch: int, scale_factor: float, sha: str | None):
        cfg = vae.config
        c = cfg.z_dim
        mean, std = torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)
        if mean.numel() != c or std.numel() != c:
            raise SarError(f"encode.weights: Wan config has {mean.numel()} latents_mean / {std.numel()} "
                           f"latents_std values for z_dim {c}")
        super().__init__("wan", image_size, c, int(vae.spatial_compression_ratio), patch,
                         mean, scale_factor / std, scale_factor, sha)
        self.vae = vae.eval().requires_grad_(False)

    def moments(self, images):
        posterior = self.vae.encode(images[:, :, None]).latent_dist  # (B, 3, T=1, H, W)
        return posterior.mean[:, :, 0], posterior.logvar[:, :, 0]

    def decode_latent(self, z):
        return self.vae.decode(z[:, :, None].to(self.vae.dtype)).sample[:, :, 0]


def make_codec(encoder: str, weights: str | None, image_size: int, patch: int | None,
               scale_factor: float | None, storage_options: dict | None = None) -> Codec:
    """The codec of a token space; weights from a local or object-store path, never a hub."""
    if encoder not in ENCODERS:
        raise SarError(f"encode.encoder: unknown encoder {encoder!r}; choose from {ENCODERS}")
    patch = patch or DEFAULT_PATCH[encoder]
    if encoder == "raw":
        if scale_factor not in (None, 1.0):
            raise SarError(f"encode.scale_factor: the raw encoder has no latent scale, got {scale_factor}")
        return RawCodec(image_size, patch)
    if not weights:
        raise SarError(f"encode.weights: the {encoder} encoder needs weights (a local or object-store path)")
    path = _local_weights(weights, storage_options)
    sha = weights_sha256(path)
    if encoder == "wan":
        from diffusers import AutoencoderKLWan

        if not os.path.isdir(path):
            raise SarError(f"encode.weights: the wan encoder needs a diffusers-format folder, got the file {weights}")
        vae = AutoencoderKLWan.from_pretrained(_diffusers_folder(path), local_files_only=True)
        return WanCodec(vae, image_size, patch, 1.0 if scale_factor is None else scale_factor, sha)

    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        vae = AutoencoderKL.from_pretrained(_diffusers_folder(path), local_files_only=True)
        scale = vae.config.scaling_factor if scale_factor is None else scale_factor
    else:
        vae = autoencoder_kl_from_ldm(load_state_dict_file(path), source=storage.redact(weights))
        if scale_factor is None:
            raise SarError(f"encode.scale_factor: {storage.redact(weights)} is an LDM checkpoint, which carries "
                           "no latent scale; set it (MAR's kl16: 0.2325)")
        scale = scale_factor
    return KLVAECodec(vae, image_size, patch, scale, sha)


def codec_from_manifest(manifest: dict, storage_options: dict | None = None) -> Codec:
    """The codec that made a latents dataset; its weights must be the ones recorded."""
    codec = make_codec(manifest["encoder"], manifest.get("weights"), manifest["image_size"],
                       manifest["patch"], manifest["scale_factor"], storage_options)
    if codec.weights_sha256 != manifest.get("weights_sha256"):
        raise DatasetMismatch(
            f"weights_sha256: dataset has {manifest.get('weights_sha256')}, "
            f"{storage.redact(manifest.get('weights') or '')} has {codec.weights_sha256}"
        )
    return codec


# The Ray Data stage ----------------------------------------------------------------------
MEAN, MEAN_FLIP, LOGVAR, LOGVAR_FLIP = "mean", "mean_flip", "logvar", "logvar_flip"
PYRAMID, TOKENS = "pyramid", "tokens"


def storage_array(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored in Parquet; bfloat16 travels as its uint16 bits."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def token_grouping(name: str, h: int, w: int, scales: list[int] | None):
    from models import make_grouping

    try:
        return make_grouping(name, h, w, scales)
    except ValueError as err:
        raise SarError(f"model.grouping / model.scales: {err} (token grid {h}x{w})") from None


class EncodeLatents:
    """Ray Data actor stage: uint8 pixels -> token grids of each image and of its flip.

    In:  key, label, pixels (S, S, 3) uint8, error.
    Out: key, label, error, mean, mean_flip (h, w, D); logvar, logvar_flip (VAEs);
         pyramid (sum s^2, D) when `scales` is set; tokens (L, D) in `grouping`'s order.
    Rows whose `error` is set are not encoded (zeros), for the writer to record as rejected.
    """

    def __init__(self, encoder: str, weights: str | None, image_size: int, patch: int | None,
                 scale_factor: float | None, grouping: str, scales: list[int] | None,
                 storage_dtype: str = "float16", storage_options: dict | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.codec = make_codec(encoder, weights, image_size, patch, scale_factor, storage_options).to(self.device)
        h, w = self.codec.grid
        self.grouping = token_grouping(grouping, h, w, scales)
        self.pyramid = token_grouping("next-scale", h, w, scales) if scales else None
        self.dtype = storage_dtype
        # bf16 autocast where the GPU has it (fp16 overflows in some VAEs), else fp16.
        self.amp = None
        if self.device.type == "cuda":
            self.amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[KEY])
        ok = np.array([not e for e in batch[ERROR]], bool)
        h, w = self.codec.grid
        D = self.codec.token_dim
        mean = torch.zeros(2, n, h, w, D)
        logvar = torch.zeros(2, n, h, w, D) if self.codec.name != "raw" else None
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch[PIXELS][ok])).to(self.device, non_blocking=True)
            x = to_model_input(pixels)
            x = torch.cat([x, hflip(x)])  # the image and its flip in one call
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                                        enabled=self.amp is not None):
                m, lv = self.codec.encode(x)
            idx = torch.from_numpy(np.flatnonzero(ok))
            mean[:, idx] = m.float().cpu().view(2, -1, h, w, D)
            if logvar is not None:
                logvar[:, idx] = lv.float().cpu().view(2, -1, h, w, D)
        out = {KEY: batch[KEY], LABEL: batch[LABEL], ERROR: batch[ERROR],
               MEAN: storage_array(mean[0], self.dtype), MEAN_FLIP: storage_array(mean[1], self.dtype)}
        if logvar is not None:
            out[LOGVAR] = storage_array(logvar[0], self.dtype)
            out[LOGVAR_FLIP] = storage_array(logvar[1], self.dtype)
        if self.pyramid is not None:
            out[PYRAMID] = storage_array(self.pyramid.to_sequence(mean[0]), self.dtype)
        out[TOKENS] = storage_array(self.grouping.to_sequence(mean[0]), self.dtype)
        return out
