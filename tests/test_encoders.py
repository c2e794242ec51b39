"""Codecs: raw patches, an LDM-format KL-VAE checkpoint against an independent reference,
a tiny Wan VAE, and the encoder stage on a two-row batch without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import make_grouping
from pipelines.core.errors import DatasetMismatch, SarError
from pipelines.data.codecs import codec_from_manifest, make_codec, patchify, unpatchify
from pipelines.data.encode import EncodeLatents
from pipelines.data.latents import ERROR, KEY, LABEL, LOGVAR, MEAN, MEAN_FLIP, PYRAMID, TOKENS, column_values
from pipelines.data.preprocess import PIXELS, hflip, to_model_input


# An independent LDM KL-VAE (CompVis latent-diffusion / MAR models/vae.py), condensed. -------
def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
        k = self.k(y).reshape(b, c, h * w)
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        out = torch.bmm(self.v(y).reshape(b, c, h * w), attn.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LDMVAE(nn.Module):
    """LDM's AutoencoderKL with attention in chosen encoder/decoder levels (MAR kl16: encoder's last)."""

    def __init__(self, ch=32, ch_mult=(1, 2, 2), blocks=1, z=4, enc_attn=(2,), dec_attn=(1,)):
        super().__init__()
        n = len(ch_mult)
        self.encoder, self.decoder = nn.Module(), nn.Module()
        e, d = self.encoder, self.decoder
        e.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        e.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl = nn.Module()
            lvl.block = nn.ModuleList([_Res(cin if j == 0 else ch * m, ch * m) for j in range(blocks)])
            lvl.attn = nn.ModuleList([_Attn(ch * m) for _ in range(blocks)] if i in enc_attn else [])
            cin = ch * m
            if i != n - 1:
                lvl.downsample = _Down(cin)
            e.down.append(lvl)
        e.mid = nn.Module()
        e.mid.block_1, e.mid.attn_1, e.mid.block_2 = _Res(cin, cin), _Attn(cin), _Res(cin, cin)
        e.norm_out, e.conv_out = _norm(cin), nn.Conv2d(cin, 2 * z, 3, 1, 1)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        d.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
        d.mid = nn.Module()
        d.mid.block_1, d.mid.attn_1, d.mid.block_2 = _Res(cin, cin), _Attn(cin), _Res(cin, cin)
        ups = []
        for i in reversed(range(n)):
            lvl = nn.Module()
            lvl.block = nn.ModuleList([_Res(cin if j == 0 else ch * ch_mult[i], ch * ch_mult[i])
                                       for j in range(blocks + 1)])
            lvl.attn = nn.ModuleList([_Attn(ch * ch_mult[i]) for _ in range(blocks + 1)] if i in dec_attn else [])
            cin = ch * ch_mult[i]
            if i != 0:
                lvl.upsample = _Up(cin)
            ups.insert(0, lvl)
        d.up = nn.ModuleList(ups)
        d.norm_out, d.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    @staticmethod
    def _level(lvl, h):
        """A level's ResNet blocks, each followed by its attention when the level has one."""
        for j, block in enumerate(lvl.block):
            h = block(h)
            if len(lvl.attn):
                h = lvl.attn[j](h)
        return h

    def moments(self, x):
        e = self.encoder
        h = e.conv_in(x)
        for lvl in e.down:
            h = self._level(lvl, h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = e.mid.block_2(e.mid.attn_1(e.mid.block_1(h)))
        h = self.quant_conv(e.conv_out(F.silu(e.norm_out(h))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
        for lvl in reversed(d.up):
            h = self._level(lvl, h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return d.conv_out(F.silu(d.norm_out(h)))


@pytest.fixture(scope="module")
def ldm_ckpt(tmp_path_factory):
    """A random LDM-format checkpoint saved as MAR saves kl16: {"model": state_dict}."""
    torch.manual_seed(0)
    ref = LDMVAE().eval()
    with torch.no_grad():
        for p in ref.parameters():  # randomise norms and biases too, so a swapped key shows
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
    path = tmp_path_factory.mktemp("ldm") / "kl.ckpt"
    torch.save({"model": ref.state_dict()}, path)
    return ref, str(path)


def test_ldm_checkpoint_matches_reference(ldm_ckpt):
    ref, path = ldm_ckpt
    codec = make_codec("kl-vae", path, image_size=16, patch=2, scale_factor=0.5)
    assert codec.grid == (2, 2) and codec.token_dim == 4 * 2 * 2 and codec.channels == 4
    assert codec.weights_sha256 and len(codec.weights_sha256) == 64
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = codec.encode(x)
    with torch.no_grad():
        ref_mean, ref_logvar = ref.moments(x)
    torch.testing.assert_close(mean, patchify(ref_mean * 0.5, 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logvar, patchify(ref_logvar + 2 * math.log(0.5), 2), atol=1e-4, rtol=1e-4)
    assert ref_mean.abs().mean() > 0.1  # a non-trivial output
    # Decoding inverts the scale and runs the LDM decoder.
    with torch.no_grad():
        expected = ref.decode(ref_mean).clamp(-1, 1)
    torch.testing.assert_close(codec.decode(mean), expected, atol=1e-4, rtol=1e-4)


def test_ldm_checkpoint_needs_a_scale(ldm_ckpt):
    with pytest.raises(SarError, match="encode.scale_factor"):
        make_codec("kl-vae", ldm_ckpt[1], 16, 1, None)


def test_ldm_conversion_fails_loudly_on_unmapped_or_missing_keys(ldm_ckpt, tmp_path):
    ref, _ = ldm_ckpt
    sd = dict(ref.state_dict())
    extra = dict(sd, **{"model_ema.decay": torch.tensor(0.9)})
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(SarError, match="unmapped|source tensors"):
        make_codec("kl-vae", str(tmp_path / "extra.ckpt"), 16, 1, 0.5)
    sd.pop("encoder.down.2.attn.0.q.weight")
    torch.save(sd, tmp_path / "missing.ckpt")
    with pytest.raises(SarError, match="missing"):
        make_codec("kl-vae", str(tmp_path / "missing.ckpt"), 16, 1, 0.5)


def test_ldm_training_losses_and_prefix_are_dropped(ldm_ckpt, tmp_path):
    ref, _ = ldm_ckpt
    sd = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "full.ckpt")
    codec = make_codec("kl-vae", str(tmp_path / "full.ckpt"), 16, 1, 1.0)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(x)[0], patchify(ref.moments(x)[0], 1), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, scaling_factor=0.3)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return vae, str(folder)


def test_diffusers_folder_takes_scale_from_its_config(diffusers_vae):
    vae, folder = diffusers_vae
    codec = make_codec("kl-vae", folder, 16, None, None)
    assert codec.scale_factor == pytest.approx(0.3) and codec.patch == 1 and codec.grid == (8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = codec.encode(x)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    torch.testing.assert_close(mean, patchify(post.mean * 0.3, 1), atol=1e-5, rtol=1e-5)
    assert logvar.shape == mean.shape == (2, 8, 8, 4)
    assert make_codec("kl-vae", folder, 16, None, 0.7).scale_factor == 0.7  # the config's value yields


def test_raw_codec_round_trip_and_layout():
    codec = make_codec("raw", None, 32, None, None)
    assert codec.patch == 16 and codec.grid == (2, 2) and codec.token_dim == 768 and codec.weights_sha256 is None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = codec.encode(x)
    assert logvar is None and mean.shape == (2, 2, 2, 768)
    # MAR's layout: token (i, j) holds channel-major, then row, then column of its patch.
    torch.testing.assert_close(mean[1, 1, 0].view(3, 16, 16), x[1, :, 16:32, 0:16])
    torch.testing.assert_close(codec.decode(mean), x)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4, 3), x)


def test_bad_sizes_and_names_are_errors(tmp_path):
    with pytest.raises(SarError, match="multiple"):
        make_codec("raw", None, 30, 16, None)
    with pytest.raises(SarError, match="unknown encoder"):
        make_codec("vqgan", None, 32, None, None)
    with pytest.raises(SarError, match="needs weights"):
        make_codec("kl-vae", None, 32, None, None)
    with pytest.raises(SarError, match="not found"):
        make_codec("kl-vae", str(tmp_path / "nope.ckpt"), 32, None, 0.2)


# Wan ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.0, 1.5],
                           scale_factor_spatial=2)
    folder = tmp_path_factory.mktemp("wan") / "tiny-wan"
    vae.save_pretrained(folder)
    return vae.eval(), str(folder)


def test_wan_codec_encodes_images_as_one_frame_videos(wan_folder):
    vae, folder = wan_folder
    codec = make_codec("wan", folder, 16, None, None)
    assert codec.patch == 2 and codec.grid == (4, 4) and codec.token_dim == 16 and codec.scale_factor == 1.0
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = codec.encode(x)
    with torch.no_grad():
        post = vae.encode(x[:, :, None]).latent_dist
    mu, std = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1), torch.tensor([0.5, 2.0, 1.0, 1.5]).view(1, 4, 1, 1)
    torch.testing.assert_close(mean, patchify((post.mean[:, :, 0] - mu) / std, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, patchify(post.logvar[:, :, 0] - 2 * torch.log(std), 2), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = vae.decode(post.mean).sample[:, :, 0]
    torch.testing.assert_close(codec.decode(mean), expected, atol=1e-5, rtol=1e-5)


def test_wan_needs_a_folder(ldm_ckpt):
    with pytest.raises(SarError, match="diffusers-format folder"):
        make_codec("wan", ldm_ckpt[1], 16, None, None)


def test_codec_from_manifest_checks_the_weights(diffusers_vae, ldm_ckpt):
    _, folder = diffusers_vae
    codec = make_codec("kl-vae", folder, 16, 1, None)
    manifest = {"encoder": "kl-vae", "weights": folder, "image_size": 16, "patch": 1,
                "scale_factor": codec.scale_factor, "weights_sha256": codec.weights_sha256}
    again = codec_from_manifest(manifest)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(again.encode(x)[0], codec.encode(x)[0])
    with pytest.raises(DatasetMismatch, match="weights_sha256"):
        codec_from_manifest(dict(manifest, weights_sha256="0" * 64))


# The encoder stage ------------------------------------------------------------------------
def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_stage_two_rows_raw_with_a_rejected_row():
    stage = EncodeLatents("raw", None, 16, 4, None, grouping="next-neighbour", scales=[1, 2, 4],
                          storage_dtype="float32")
    pixels = _pixels(2, 16)
    batch = {KEY: np.array(["a", "b"], dtype=object), LABEL: np.array([3, 5]), PIXELS: pixels,
             ERROR: np.array(["", "empty file (0 bytes)"], dtype=object)}
    out = stage(batch)
    x = to_model_input(torch.from_numpy(pixels[:1]))
    torch.testing.assert_close(torch.from_numpy(out[MEAN][:1]), patchify(x, 4))
    torch.testing.assert_close(torch.from_numpy(out[MEAN_FLIP][:1]), patchify(hflip(x), 4))
    assert (out[MEAN][1] == 0).all() and LOGVAR not in out
    g = make_grouping("next-neighbour", 4, 4)
    torch.testing.assert_close(torch.from_numpy(out[TOKENS]), g.to_sequence(torch.from_numpy(out[MEAN])))
    assert out[PYRAMID].shape == (2, 1 + 4 + 16, 48)
    # The 1x1 scale of the pyramid is the area mean of the grid.
    torch.testing.assert_close(torch.from_numpy(out[PYRAMID][0, 0]), torch.from_numpy(out[MEAN][0]).mean((0, 1)))
    assert list(out[LABEL]) == [3, 5] and list(out[ERROR]) == ["", "empty file (0 bytes)"]


def test_encode_stage_kl_vae_stores_bfloat16_bits(diffusers_vae):
    _, folder = diffusers_vae
    stage = EncodeLatents("kl-vae", folder, 16, 2, None, grouping="next-scale", scales=[1, 2, 4],
                          storage_dtype="bfloat16")
    out = stage({KEY: np.array(["a", "b"], dtype=object), LABEL: np.array([0, 1]), PIXELS: _pixels(2, 16, 1),
                 ERROR: np.array(["", ""], dtype=object)})
    assert out[MEAN].dtype == np.uint16 and out[LOGVAR].shape == (2, 4, 4, 16)
    mean = column_values(torch.from_numpy(out[MEAN]))  # as Ray Data hands it to training
    expected, _ = stage.codec.encode(to_model_input(torch.from_numpy(_pixels(2, 16, 1))))
    torch.testing.assert_close(mean.float(), expected, atol=2e-2, rtol=1e-2)
    assert out[TOKENS].shape == (2, 1 + 4 + 16, 16)  # next-scale tokens are the pyramid
