"""SAR: spatial autoregression with self-token prediction (backbone, flow head, guidance, presets).

Reads bottom-up as DiT's models.py: helpers, attention masks, embeddings, the block, the
backbone, the flow-matching head, the model, then the size presets.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from .grouping import make_grouping

COND, CONTEXT, GENERATION = 0, 1, 2  # stream ids: the class token, context_stream, generation_stream


@dataclass
class SARConfig:
    token_dim: int = 16          # KL-VAE kl16: 16 channels, patch 1 (paper Table 3, main space)
    height: int = 16             # token grid h (256px / stride 16)
    width: int = 16              # token grid w
    grouping: str = "next-neighbour"  # best FID with Agg_AVG (paper Fig. 8 table); 31 steps at 16x16
    scales: tuple[int, ...] | None = None  # next-scale only; None -> (1, 2, 4, ..., height)
    num_classes: int = 1000
    depth: int = 12
    width_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1   # trains the unconditional backbone for CFG / z-CFG (DESIGN 3)
    head_depth: int = 3          # residual AdaLN blocks in the flow head (MAR SimpleMLPAdaLN)
    head_width: int = 1024       # MAR's diffloss width
    head_batch_mul: int = 4      # t samples per token per step (MAR diffusion_batch_mul)
    z_dropout: float = 0.1       # z -> 0 trains the unconditional head branch for x-CFG (paper Fig. 12)
    flow_steps: int = 50         # Euler steps from t=0 (noise) to t=1 (data)
    time_schedule: str = "uniform"  # sampler grid: 'uniform' | 'shifted' (SD3 time shift toward noise)
    time_shift: float = 3.0      # shift s for 'shifted': sigma' = s*sigma / (1 + (s-1)*sigma), SD3 eq. 23
    train_time: str = "uniform"  # training t: 'uniform' | 'logit_normal' (SD3's logit-normal, m=0 s=1)
    attention: str = "auto"      # 'auto' (flex on CUDA, sdpa elsewhere) | 'flex' | 'sdpa'; flex on CPU
                                 # compiles and is inference-only (torch 2.13 has no CPU flex backward)
    grad_checkpointing: bool = False  # recompute each block in backward (activation checkpointing)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_2d(coords, dim, grid):
    """Fixed 2-D sin-cos embedding (L, dim) of normalised (row, col) coordinates in [0, 1]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=coords.device) / (dim // 4))
    out = []
    for axis in range(2):
        angle = coords[:, axis, None].double() * grid * omega          # in finest-grid units
        out += [angle.sin(), angle.cos()]
    return torch.cat(out, 1).float()                                    # (L, dim)


def group_causal_mask(q_stream, q_group, k_stream, k_group, single_stream):
    """True where a query may attend a key (DESIGN 3); broadcasts, and serves as a flex mask_mod.

    cond attends to itself; a context token of group t to cond and context groups <= t; a
    generation token of group t to cond, context groups < t and generation tokens of group t.
    Single (shift-aligned) stream: a generation token of group t attends generation groups <= t.
    """
    q_ctx, q_gen = q_stream == CONTEXT, q_stream == GENERATION
    k_ctx, k_gen = k_stream == CONTEXT, k_stream == GENERATION
    gen_gen = (k_group <= q_group) if single_stream else (k_group == q_group)
    return ((k_stream == COND)
            | (q_ctx & k_ctx & (k_group <= q_group))
            | (q_gen & k_ctx & (k_group < q_group))
            | (q_gen & k_gen & gen_gen))


_BLOCK_MASKS = {}
_FLEX = None


def flex_block_mask(stream, group, single_stream, key):
    """FlexAttention BlockMask of the group-causal rule, built once per (grouping, seq, device)."""
    if key not in _BLOCK_MASKS:
        def mask_mod(b, h, q, k):
            return group_causal_mask(stream[q], group[q], stream[k], group[k], single_stream)
        S = stream.numel()
        _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, S, S, device=stream.device)
    return _BLOCK_MASKS[key]


def flex(q, k, v, block_mask):
    """Compiled flex_attention (the eager path materialises the whole score matrix)."""
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    return _FLEX(q, k, v, block_mask=block_mask)


class KVCache:
    """Keys/values of the tokens later groups attend (cond, context_stream) and their (stream, group)."""

    def __init__(self, depth):
        self.kv = [None] * depth
        self.stream = self.group = None

    def append(self, layer, kv, keep):
        k, v = (t[:, :, keep] for t in kv)
        if self.kv[layer] is not None:
            k, v = torch.cat([self.kv[layer][0], k], 2), torch.cat([self.kv[layer][1], v], 2)
        self.kv[layer] = (k, v)

    def append_meta(self, stream, group):
        if self.stream is not None:
            stream, group = torch.cat([self.stream, stream]), torch.cat([self.group, group])
        self.stream, self.group = stream, group


#################################################################################
#                                 Backbone                                      #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention over [cached keys; new tokens] with a group-causal mask."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.width_dim, 3 * config.width_dim)
        self.proj = nn.Linear(config.width_dim, config.width_dim)

    def forward(self, x, mask, past=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        new_kv = (k, v)                                                  # (B, H, N, C/H) each
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)  # (B, H, S, C/H)
        if isinstance(mask, BlockMask):
            x = flex(q, k, v, mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, C/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, C)), new_kv   # (B, N, C)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config):
        super().__init__()
        hidden = int(config.width_dim * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.width_dim, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.width_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(config.width_dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, config.width_dim))

    def forward(self, x, mask, past=None):
        a, kv = self.attn(self.norm1(x), mask, past)                    # (B, N, C)
        x = x + a
        x = x + self.mlp(self.norm2(x))                                 # (B, N, C)
        return x, kv


class Backbone(nn.Module):
    """Stack of blocks over [cond] + context_stream + generation_stream; optional KV cache."""

    def __init__(self, config):
        super().__init__()
        self.grad_checkpointing = config.grad_checkpointing
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width_dim, eps=1e-6)

    def forward(self, x, mask, cache=None, keep=None):
        for i, block in enumerate(self.blocks):
            past = cache.kv[i] if cache is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(block, x, mask, past, use_reentrant=False)
            else:
                x, kv = block(x, mask, past)                            # (B, N, C)
            if cache is not None:
                cache.append(i, kv, keep)
        return self.norm(x)


#################################################################################
#                              Flow-matching head                               #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> vector (DiT's sinusoidal frequencies on 1000 t)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angle = 1000 * t.float()[:, None] * freqs[None]                 # (N, half)
        return self.mlp(torch.cat([angle.cos(), angle.sin()], -1))      # (N, width)


class ResBlock(nn.Module):
    """MLP residual block with AdaLN shift/scale/gate from (z, t) (MAR's ResBlock)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, c):
        shift, scale, gate = self.ada_ln(c).chunk(3, -1)                # (N, width) each
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    """AdaLN then a linear map to the velocity."""

    def __init__(self, width, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out_dim)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.ada_ln(c).chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))        # (N, out_dim)


class FlowHead(nn.Module):
    """Per-token velocity v(x_t, t, z) on the rectified-flow path (MAR's SimpleMLPAdaLN)."""

    def __init__(self, token_dim, cond_dim, width, depth):
        super().__init__()
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final = FinalLayer(width, token_dim)

    def forward(self, x_t, t, z):
        x = self.input_proj(x_t)                                        # (N, width)
        c = self.time_embed(t) + self.cond_embed(z)                     # (N, width)
        for block in self.blocks:
            x = block(x, c)                                             # (N, width)
        return self.final(x, c)                                         # (N, token_dim)


#################################################################################
#                                  Guidance                                     #
#################################################################################

GUIDANCE_KINDS = ("none", "cfg", "z_cfg", "x_cfg", "xz_cfg")


@dataclass
class Guidance:
    """Guidance at sampling (paper Fig. 12, Table 2); C backbone cost, c head cost.

    none: C + c.  cfg: v = v_u + cfg (v_c - v_u), 2C + 2c.  z_cfg: z = z_u + w_z (z_c - z_u), 2C + c.
    x_cfg: v = v_0 + w_x (v_z - v_0) with v_0 the head at z = 0, C + 2c.  xz_cfg: both, 2C + 2c.
    ramp: weights grow linearly over AR steps, w_t = 1 + (w - 1) (t + 1) / T (MAR's linear cfg).
    """
    kind: str = "none"
    cfg: float = 1.0
    w_x: float = 1.0
    w_z: float = 1.0
    ramp: bool = False

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance {self.kind!r}; choose from {GUIDANCE_KINDS}")

    @property
    def needs_uncond_backbone(self):
        return self.kind in ("cfg", "z_cfg", "xz_cfg")

    def weights(self, t, num_groups):
        """(cfg, w_x, w_z) at AR step t."""
        f = (t + 1) / num_groups if self.ramp else 1.0
        return tuple(1 + (w - 1) * f for w in (self.cfg, self.w_x, self.w_z))


#################################################################################
#                                  SAR model                                    #
#################################################################################

class SARModel(nn.Module):
    """Self-token prediction: group-causal backbone giving z per token, flow head sampling tokens.

    Class conditioning is a condition token (the `[cond]` prefix of DESIGN 3) rather than AdaLN:
    it is the sequence layout the group-causal mask is defined on, it is computed once and kept
    in the KV cache at sampling, and it keeps the backbone a plain causal transformer (AdaLN
    would add 6 W^2 parameters per block and a per-block modulation of every cached token).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.grouping = make_grouping(config.grouping, config.height, config.width, config.scales)
        self.single_stream = self.grouping.shift_aligned
        W, g = config.width_dim, self.grouping
        self.input_proj = nn.Linear(config.token_dim, W)
        self.start_token = nn.Parameter(torch.zeros(W))             # input of the first group
        self.class_embed = nn.Embedding(config.num_classes + 1, W)  # last row: the null class
        self.stream_embed = nn.Embedding(3, W)                      # cond, context, generation
        self.scale_embed = nn.Embedding(len(g.scales), W) if g.scales else None
        pos = sincos_2d(g.coords, W, max(config.height, config.width))
        self.register_buffer("pos_embed", pos, persistent=False)    # (L, W)
        self.backbone = Backbone(config)
        self.head = FlowHead(config.token_dim, W, config.head_width, config.head_depth)
        self.initialize_weights()

    def initialize_weights(self):
        # Transformer and head linears: xavier, zero bias (DiT).
        def _basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic_init)
        # Embeddings and the start token: small normal.
        for p in [self.class_embed.weight, self.stream_embed.weight, self.start_token]:
            nn.init.normal_(p, std=0.02)
        if self.scale_embed is not None:
            nn.init.normal_(self.scale_embed.weight, std=0.02)
        # Head: timestep MLP normal; AdaLN modulations and the output layer zero (MAR / DiT).
        for m in self.head.time_embed.mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        for block in list(self.head.blocks) + [self.head.final]:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        nn.init.zeros_(self.head.final.linear.weight)
        nn.init.zeros_(self.head.final.linear.bias)

    # ---- sequence assembly --------------------------------------------------------------
    def _null_labels(self, labels):
        return torch.full_like(labels, self.config.num_classes)

    def _condition_labels(self, labels, drop_labels):
        """Replace dropped labels by the null class (random class_dropout when training)."""
        if drop_labels is None and self.training and self.config.class_dropout > 0:
            drop_labels = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
        if drop_labels is None:
            return labels
        return torch.where(drop_labels, self._null_labels(labels), labels)

    def _embed(self, values, positions, stream):
        """Token values (B, P, D) at sequence positions (P,) -> embeddings (B, P, W)."""
        x = self.input_proj(values)                                      # (B, P, W)
        if stream == GENERATION:                                         # first group: start token
            first = self.grouping.tensors(values.device)["group_index"][positions] == 0
            x = torch.where(first[:, None], self.start_token.to(x.dtype), x)
        x = x + self.pos_embed[positions] + self.stream_embed.weight[stream]
        if self.scale_embed is not None:
            x = x + self.scale_embed(self.grouping.tensors(values.device)["scale_index"][positions])
        return x

    def _tokens(self, x, labels, context_pos, generation_pos):
        """[cond] + context_stream + generation_stream embeddings (B, S, W) and their (stream, group).

        x (B, L, D) are tokens in sequence order; only groups before each generation token's
        group are read through the dependency injection. labels None: no cond token.
        """
        device = x.device
        group_index = self.grouping.tensors(device)["group_index"]
        parts, stream, group = [], [], []
        if labels is not None:
            parts.append(self.class_embed(labels)[:, None] + self.stream_embed.weight[COND])  # (B, 1, W)
            stream.append(torch.full((1,), COND, device=device))
            group.append(torch.full((1,), -1, device=device))
        if context_pos is not None and context_pos.numel():
            parts.append(self._embed(x[:, context_pos], context_pos, CONTEXT))
            stream.append(torch.full_like(context_pos, CONTEXT))
            group.append(group_index[context_pos])
        h = self.grouping.dependency_injection(x, generation_pos)       # (B, P, D)
        parts.append(self._embed(h, generation_pos, GENERATION))
        stream.append(torch.full_like(generation_pos, GENERATION))
        group.append(group_index[generation_pos])
        return torch.cat(parts, 1), torch.cat(stream), torch.cat(group)

    def layout(self, device):
        """(stream, group) of each position of the one-pass sequence [cond] + context + generation."""
        group_index = self.grouping.tensors(device)["group_index"]
        streams = [GENERATION] if self.single_stream else [CONTEXT, GENERATION]
        stream = torch.cat([torch.full((1,), COND, device=device)]
                           + [torch.full_like(group_index, s) for s in streams])
        group = torch.cat([torch.full((1,), -1, device=device)] + [group_index] * len(streams))
        return stream, group

    def attention_mask(self, device, backend=None):
        """Mask of the one-pass sequence: a BlockMask (flex) or bool (S, S) (sdpa), built once."""
        device = torch.device(device)
        backend = backend or self.config.attention
        if backend == "auto":
            backend = "flex" if device.type == "cuda" else "sdpa"
        g = self.grouping
        stream, group = self.layout(device)
        key = (backend, g.name, g.height, g.width, g.scales, stream.numel(), str(device))
        if backend == "flex":
            return flex_block_mask(stream, group, self.single_stream, key)
        if backend != "sdpa":
            raise ValueError(f"unknown attention backend {backend!r}")
        if key not in _BLOCK_MASKS:
            _BLOCK_MASKS[key] = group_causal_mask(
                stream[:, None], group[:, None], stream[None], group[None], self.single_stream)
        return _BLOCK_MASKS[key]

    # ---- training -----------------------------------------------------------------------
    def forward(self, x, labels, *, drop_labels=None):
        """One pass over all groups (paper Fig. 2, bottom): z (B, L, W) at generation positions."""
        B, L, D = x.shape
        labels = self._condition_labels(labels, drop_labels)
        positions = torch.arange(L, device=x.device)
        context_pos = None if self.single_stream else positions
        seq, _, _ = self._tokens(x, labels, context_pos, positions)     # (B, S, W)
        h = self.backbone(seq, self.attention_mask(x.device))           # (B, S, W)
        return h[:, -L:]                                                # (B, L, W)

    def forward_group(self, x, labels, t, *, drop_labels=None):
        """z (B, n_t, W) of group t from its own forward over the prefix (Fig. 2 top: naive)."""
        g = self.grouping
        labels = self._condition_labels(labels, drop_labels)
        sl = g.group_slice(t)
        if self.single_stream:
            context_pos, generation_pos = None, torch.arange(sl.stop, device=x.device)
        else:
            context_pos = torch.arange(sl.start, device=x.device)
            generation_pos = torch.arange(sl.start, sl.stop, device=x.device)
        seq, stream, group = self._tokens(x, labels, context_pos, generation_pos)
        mask = group_causal_mask(stream[:, None], group[:, None], stream[None], group[None], self.single_stream)
        return self.backbone(seq, mask)[:, -(sl.stop - sl.start):]      # (B, n_t, W)

    def _train_times(self, n, device):
        if self.config.train_time == "logit_normal":
            return torch.sigmoid(torch.randn(n, device=device))
        return torch.rand(n, device=device)

    def flow_loss(self, z, target):
        """Per-token flow-matching loss (B, L): ||v(x_t, t, z) - (x - e)||^2, x_t = t x + (1 - t) e."""
        B, L, W = z.shape
        m = self.config.head_batch_mul
        z = z.reshape(B * L, W).repeat(m, 1)                            # (m B L, W)
        x = target.reshape(B * L, -1).repeat(m, 1).float()              # (m B L, D)
        if self.training and self.config.z_dropout > 0:                 # unconditional head branch
            keep = torch.rand(z.shape[0], 1, device=z.device) >= self.config.z_dropout
            z = z * keep.to(z.dtype)
        t = self._train_times(x.shape[0], x.device)                     # (m B L,)
        e = torch.randn_like(x)
        x_t = t[:, None] * x + (1 - t[:, None]) * e
        v = self.head(x_t, t, z)                                        # (m B L, D)
        loss = (v.float() - (x - e)).pow(2).mean(-1)                    # (m B L,)
        return loss.view(m, B, L).mean(0)                               # (B, L)

    # ---- sampling -----------------------------------------------------------------------
    def time_grid(self, steps, device):
        """Euler time points 0 = t_0 < ... < t_steps = 1."""
        t = torch.linspace(0, 1, steps + 1, device=device)
        if self.config.time_schedule == "shifted":                      # more steps near the noise
            s, sigma = self.config.time_shift, 1 - t
            t = 1 - s * sigma / (1 + (s - 1) * sigma)
        elif self.config.time_schedule != "uniform":
            raise ValueError(f"unknown time_schedule {self.config.time_schedule!r}")
        return t

    def _velocity(self, x, t, z, kind, cfg, w_x):
        """Guided velocity (N, D) at x (N, D), time t; z is (2N, W) [cond; uncond] for cfg."""
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        if kind == "cfg":                                               # 2 head passes, 2 backbones
            v_c, v_u = self.head(torch.cat([x, x]), torch.cat([tt, tt]), z).float().chunk(2)
            return v_u + cfg * (v_c - v_u)
        if kind in ("x_cfg", "xz_cfg"):                                 # 2 head passes, z and 0
            v_z, v_0 = self.head(torch.cat([x, x]), torch.cat([tt, tt]),
                                 torch.cat([z, torch.zeros_like(z)])).float().chunk(2)
            return v_0 + w_x * (v_z - v_0)
        return self.head(x, tt, z).float()

    def _sample_head(self, z, noise, steps, kind="none", cfg=1.0, w_x=1.0, w_z=1.0, mode="ode"):
        """Tokens (B, N, D) from head conditions z (B, N, W) (or (2B, N, W) [cond; uncond])."""
        B, N, D = noise.shape
        if kind in ("z_cfg", "xz_cfg"):                                 # guide in feature space
            z_c, z_u = z.chunk(2)
            z = z_u + w_z * (z_c - z_u)
        z = z.reshape(-1, z.shape[-1])                                  # (B N, W); cfg: (2 B N, W)
        x = noise.reshape(B * N, D).float()
        if mode == "one_step":                                          # clean estimate e + v(e, 0)
            return (x + self._velocity(x, 0.0, z, kind, cfg, w_x)).view(B, N, D)
        if mode != "ode":
            raise ValueError(f"unknown sampling mode {mode!r}")
        ts = self.time_grid(steps, x.device).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):                             # Euler, t = 0 -> 1
            x = x + (t1 - t0) * self._velocity(x, t0, z, kind, cfg, w_x)
        return x.view(B, N, D)

    @staticmethod
    def _noise(shape, generator, device):
        """Standard normal (B, N, D); a list of generators draws each sample from its own."""
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)

    @torch.no_grad()
    def sample_from_z(self, z, *, generator=None, steps=None, noise=None, x_cfg=1.0, mode="ode"):
        """Tokens (B, L, D) from head conditions z (B, L, W); mode 'ode' (Euler) or 'one_step'."""
        B, L, _ = z.shape
        if noise is None:
            noise = self._noise((B, L, self.config.token_dim), generator, z.device)
        kind = "x_cfg" if x_cfg != 1.0 else "none"
        return self._sample_head(z, noise, steps or self.config.flow_steps, kind, w_x=x_cfg, mode=mode)

    def _decode_step(self, x, labels, t, cache):
        """z (B, n_t, W) of group t in one backbone call: feeds [context(G_{t-1}); generation(G_t)]."""
        g, device = self.grouping, x.device
        sl = g.group_slice(t)
        generation_pos = torch.arange(sl.start, sl.stop, device=device)
        context_pos = None
        if t > 0 and not self.single_stream:
            prev = g.group_slice(t - 1)
            context_pos = torch.arange(prev.start, prev.stop, device=device)
        seq, stream, group = self._tokens(x, labels if t == 0 else None, context_pos, generation_pos)
        # Keep cond and context K/V; generation K/V only in the single stream, where later
        # groups attend them.
        keep = (stream != GENERATION) | self.single_stream
        k_stream, k_group = stream, group
        if cache.stream is not None:
            k_stream, k_group = torch.cat([cache.stream, stream]), torch.cat([cache.group, group])
        mask = group_causal_mask(stream[:, None], group[:, None], k_stream[None], k_group[None],
                                 self.single_stream)                    # (N, S_cache + N)
        h = self.backbone(seq, mask, cache=cache, keep=keep)            # (B, N, W)
        cache.append_meta(stream[keep], group[keep])
        return h[:, -generation_pos.numel():]                           # (B, n_t, W)

    @torch.no_grad()
    def decode_teacher_forced(self, x, labels):
        """z (B, L, W) group by group through the KV cache on ground truth x (equals forward())."""
        cache = KVCache(self.config.depth)
        return torch.cat([self._decode_step(x, labels, t, cache)
                          for t in range(self.grouping.num_groups)], 1)

    @torch.no_grad()
    def generate(self, labels, *, seeds, guidance=None, flow_steps=None, use_cache=True):
        """Tokens (B, L, D), one group per step; sample i's noise comes from its own seed."""
        guidance = guidance or Guidance()
        g, device = self.grouping, labels.device
        B, D = labels.shape[0], self.config.token_dim
        seeds = seeds.tolist() if torch.is_tensor(seeds) else list(seeds)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        two = guidance.needs_uncond_backbone
        cond_labels = torch.cat([labels, self._null_labels(labels)]) if two else labels
        x = torch.zeros(B, g.seq_len, D, device=device)
        cache = KVCache(self.config.depth) if use_cache else None
        for t in range(g.num_groups):
            x_in = torch.cat([x, x]) if two else x
            if use_cache:
                z = self._decode_step(x_in, cond_labels, t, cache)      # (B or 2B, n_t, W)
            else:
                z = self.forward_group(x_in, cond_labels, t, drop_labels=torch.zeros_like(cond_labels).bool())
            sl = g.group_slice(t)
            noise = self._noise((B, sl.stop - sl.start, D), generators, device)
            cfg, w_x, w_z = guidance.weights(t, g.num_groups)
            x[:, sl] = self._sample_head(z.float(), noise, flow_steps or self.config.flow_steps,
                                         guidance.kind, cfg, w_x, w_z)
        return x


def count_parameters(model):
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                                  SAR presets                                  #
#################################################################################
# The paper gives only parameter counts (Table 4: 141M / 714M / 1.3B). Widths chosen here,
# counted for the 16x16 grid with KL-VAE 16-dim tokens (next-neighbour, 1000 classes):
#   sar-b: 16 blocks x 768 (12 heads of 64), head 4 x 1024   -> ~139.3M
#   sar-l: 24 blocks x 1536 (24 heads of 64), head 4 x 1024  -> ~707.7M
#   sar-h: 32 blocks x 1792 (28 heads of 64), head 6 x 1536  -> ~1.317B
#   tiny:  2 blocks x 64 (4 heads), head 2 x 64: tests and CPU demos.
PRESETS = {
    "tiny": dict(depth=2, width_dim=64, num_heads=4, head_depth=2, head_width=64, head_batch_mul=2),
    "sar-b": dict(depth=16, width_dim=768, num_heads=12, head_depth=4, head_width=1024),
    "sar-l": dict(depth=24, width_dim=1536, num_heads=24, head_depth=4, head_width=1024),
    "sar-h": dict(depth=32, width_dim=1792, num_heads=28, head_depth=6, head_width=1536),
}


def build_model(preset, **overrides):
    """SARModel from a preset name and SARConfig field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    names = {f.name for f in fields(SARConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown SARConfig fields {sorted(unknown)}")
    config = SARConfig(**{**PRESETS[preset], **overrides})
    if config.scales is not None:
        config.scales = tuple(config.scales)
    return SARModel(config)
