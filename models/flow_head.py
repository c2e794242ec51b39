"""The flow-matching head: a per-token MLP velocity field, its loss and its ODE sampler.

The counterpart of MAR's `diffloss.py` for the self-token paper's best objective (Table 3):
a small MLP with AdaLN conditioned on (z, t) (MAR's SimpleMLPAdaLN) predicts the velocity
v = x - e on the rectified-flow path x_t = t x + (1 - t) e, from t = 0 (noise) to t = 1 (data).
Training draws `batch_mul` times per token (MAR's diffusion_batch_mul); sampling integrates
the ODE with Euler steps, under the guidance of `models.guidance`.
"""
import math

import torch
import torch.nn as nn

from .guidance import Guidance


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


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
    """Per-token velocity v(x_t, t, z), the flow-matching loss, and the guided Euler sampler."""

    def __init__(self, config):
        super().__init__()
        width, self.token_dim = config.head_width, config.token_dim
        self.batch_mul = config.head_batch_mul
        self.z_dropout = config.z_dropout                # z -> 0 trains the unconditional branch
        self.train_time = config.train_time
        self.time_schedule, self.time_shift = config.time_schedule, config.time_shift
        self.input_proj = nn.Linear(config.token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(config.hidden_size, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(config.head_depth)])
        self.final = FinalLayer(width, config.token_dim)

    def initialize_weights(self):
        # Timestep MLP normal; AdaLN modulations and the output layer zero (MAR / DiT), so the
        # head starts as v = 0 and each block as the identity.
        for m in self.time_embed.mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        for block in list(self.blocks) + [self.final]:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def condition(self, t, z):
        """The AdaLN condition (N, width) of times t (N,) and backbone outputs z (N, W)."""
        return self.time_embed(t) + self.cond_embed(z)

    def forward(self, x_t, c):
        """v (N, D) at x_t (N, D) under the condition c (N, width) = condition(t, z)."""
        x = self.input_proj(x_t)                                        # (N, width)
        for block in self.blocks:
            x = block(x, c)                                             # (N, width)
        return self.final(x, c)                                         # (N, token_dim)

    # ---- training -----------------------------------------------------------------------
    def _train_times(self, n, device):
        if self.train_time == "logit_normal":                           # SD3's logit-normal, m=0 s=1
            return torch.sigmoid(torch.randn(n, device=device))
        return torch.rand(n, device=device)

    def loss(self, z, target):
        """Per-token loss (B, L): ||v(x_t, t, z) - (x - e)||^2 with x_t = t x + (1 - t) e."""
        B, L, W = z.shape
        m = self.batch_mul
        z = z.reshape(B * L, W).repeat(m, 1)                            # (m B L, W)
        x = target.reshape(B * L, -1).repeat(m, 1).float()              # (m B L, D)
        if self.training and self.z_dropout > 0:
            keep = torch.rand(z.shape[0], 1, device=z.device) >= self.z_dropout
            z = z * keep.to(z.dtype)
        t = self._train_times(x.shape[0], x.device)                     # (m B L,)
        e = torch.randn_like(x)
        x_t = t[:, None] * x + (1 - t[:, None]) * e
        v = self(x_t, self.condition(t, z))                             # (m B L, D)
        loss = (v.float() - (x - e)).pow(2).mean(-1)                    # (m B L,)
        return loss.view(m, B, L).mean(0)                               # (B, L)

    # ---- sampling -----------------------------------------------------------------------
    def time_grid(self, steps, device):
        """ODE time points 0 = t_0 < ... < t_steps = 1."""
        t = torch.linspace(0, 1, steps + 1, device=device)
        if self.time_schedule == "shifted":                             # more steps near the noise
            s, sigma = self.time_shift, 1 - t                           # SD3 eq. 23
            t = 1 - s * sigma / (1 + (s - 1) * sigma)
        elif self.time_schedule != "uniform":
            raise ValueError(f"unknown time_schedule {self.time_schedule!r}")
        return t

    def _guided_velocity(self, x, t, cz, guidance):
        """Guided v (N, D) at x (N, D) and time t; cz are the embedded conditions, (2N, width)
        [cond; uncond] for cfg, [z; 0] for x-CFG, else (N, width): one batched head call."""
        c = cz + self.time_embed(torch.full((1,), float(t), device=x.device))  # (N or 2N, width)
        if guidance.head_calls == 1:
            return self(x, c).float()
        v_a, v_b = self(torch.cat([x, x]), c).float().chunk(2)
        w = guidance.cfg if guidance.kind == "cfg" else guidance.w_x
        return v_b + w * (v_a - v_b)                                    # v_u + w (v_c - v_u)

    def sample(self, z, noise, steps, guidance=None, mode="ode"):
        """Tokens (B, N, D) from conditions z (B, N, W), or (2B, N, W) [cond; uncond] when the
        guidance needs the unconditional backbone; `mode` 'one_step' is the clean estimate
        e + v(e, 0), one evaluation."""
        guidance = guidance or Guidance()
        B, N, D = noise.shape
        if guidance.kind in ("z_cfg", "xz_cfg"):                        # guide in feature space
            z_c, z_u = z.chunk(2)
            z = z_u + guidance.w_z * (z_c - z_u)
        z = z.reshape(-1, z.shape[-1])                                  # (B N, W); cfg: (2 B N, W)
        if guidance.kind in ("x_cfg", "xz_cfg"):                        # the head at z and at 0
            z = torch.cat([z, torch.zeros_like(z)])
        cz = self.cond_embed(z)                                         # once, not per step
        x = noise.reshape(B * N, D).float()
        if mode == "one_step":
            return (x + self._guided_velocity(x, 0.0, cz, guidance)).view(B, N, D)
        if mode != "ode":
            raise ValueError(f"unknown sampling mode {mode!r}")
        ts = self.time_grid(steps, x.device).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):                             # Euler, t = 0 -> 1
            x = x + (t1 - t0) * self._guided_velocity(x, t0, cz, guidance)
        return x.view(B, N, D)
