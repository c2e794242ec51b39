"""Token spaces: images <-> grids of continuous tokens (the codecs the encode and sample stages use).

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

Weights are read from a local or object-store path (storage.local_copy), never a hub;
LDM-format checkpoints are converted by pipelines/data/ldm_vae.py.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from pipelines.core import storage
from pipelines.core.errors import DatasetMismatch, SarError
from pipelines.data.ldm_vae import autoencoder_kl_from_ldm, load_state_dict_file

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
        with storage.field("encode.weights"):
            return storage.local_copy(url, storage_options)
    except storage.NotFound:
        raise SarError(f"encode.weights: not found: {storage.redact(url)}") from None


def _diffusers_folder(path: str) -> str:
    """The folder holding config.json: the path itself, or its `vae/` (a pipeline folder)."""
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise SarError(f"encode.weights: {path} has no config.json (nor vae/config.json): not a diffusers folder")



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

