"""The flow-matching head: a per-token MLP velocity field, its loss and its ODE sampler.

The counterpart of MAR's `diffloss.py` for the self-token paper's best objective (Table 3):
a small MLP with AdaLN conditioned on (z, t) (MAR's SimpleMLPAdaLN) predicts the velocity
v = x - e on the rectified-flow path x_t = t x + (1 - t) e, from t = 0 (noise) to t = 1 (data).
Training draws `batch_mul` times per token (MAR's diffusion_batch_mul); sampling integrates
the ODE from `temperature` x noise, under the guidance of `models.guidance`, with one of
    euler     x += dt v(x, t)                                          steps evaluations
    heun      trapezoid of v(x, t) and v(x + dt v, t + dt)            2 x steps
    midpoint  v at x + dt/2 v(x, t), t + dt/2                          2 x steps
Heun is used on the last step too: EDM (Karras et al. 2022, Alg. 1) ends with an Euler step
because its derivative (x - D(x; sigma)) / sigma is 0/0 at sigma = 0, but the rectified-flow
velocity v(x, t) = E[x_data - e | x_t = x] is finite at t = 1 (there x_t is the data and
E[e | x_t] = E[e] = 0, so v(x, 1) = x): the second evaluation is well defined (t = 1 is the
edge of the training times, seldom drawn under logit-normal), and keeping it keeps every step
second order, 2 x steps evaluations in all. Not so under x-prediction (`head_prediction: x`): there
v = (x_hat - x_t) / (1 - t) is singular at t = 1 (1 - t is clipped at x_pred_eps), so the last Heun
step is Euler, which lands on the clean estimate x_hat (2 x steps - 1 evaluations).
Every evaluation is one head call, whatever the guidance (its branches are batched).
"""
import math

import torch
import torch.nn as nn

from .choices import SOLVERS
from .guidance import Guidance

_COMPILED = {}


def compiled(step, device):
    """`step` compiled once with CUDA graphs (torch.compile "reduce-overhead") on CUDA, where
    the head's many small kernels are launch bound; elsewhere `step` itself."""
    if device.type != "cuda":
        return step
    if step not in _COMPILED:
        graphed = torch.compile(step, mode="reduce-overhead", dynamic=True)

        def run(*args):
            # The graphs' output buffers are rewritten by the next replay, which takes this
            # step's output as its input: a new graph step, and a copy the graphs do not own.
            torch.compiler.cudagraph_mark_step_begin()
            return graphed(*args).clone()
        _COMPILED[step] = run
    return _COMPILED[step]


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


class MLPHead(nn.Module):
    """The per-token AdaLN MLP of MAR's diffusion loss, out(x_t, t, z), with batched guidance."""

    def __init__(self, config, out_dim):
        super().__init__()
        width, self.token_dim = config.head_width, config.token_dim
        self.batch_mul = config.head_batch_mul
        self.z_dropout = config.z_dropout                # z -> 0 trains the unconditional branch
        self.input_proj = nn.Linear(config.token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(config.hidden_size, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(config.head_depth)])
        self.final = FinalLayer(width, out_dim)

    def initialize_weights(self):
        # Timestep MLP normal; AdaLN modulations and the output layer zero (MAR / DiT), so the
        # head starts with a zero output and each block as the identity.
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
        """The output (N, out_dim) at x_t (N, D) under the condition c (N, width) = condition(t, z)."""
        x = self.input_proj(x_t)                                        # (N, width)
        for block in self.blocks:
            x = block(x, c)                                             # (N, width)
        return self.final(x, c)                                         # (N, out_dim)

    def _train_inputs(self, z, target):
        """z (m B L, W) with z dropout and targets (m B L, D): `batch_mul` draws per token."""
        B, L, W = z.shape
        z = z.reshape(B * L, W).repeat(self.batch_mul, 1)               # (m B L, W)
        x = target.reshape(B * L, -1).repeat(self.batch_mul, 1).float()  # (m B L, D)
        if self.training and self.z_dropout > 0:
            keep = torch.rand(z.shape[0], 1, device=z.device) >= self.z_dropout
            z = z * keep.to(z.dtype)
        return z, x

    # ---- guidance -----------------------------------------------------------------------
    def guidance_inputs(self, z, guidance, token_weights=None):
        """The embedded conditions (N or 2N, width) of z (B, N, W), or (2B, N, W) [cond; uncond]
        when the guidance needs the unconditional backbone, and the head-level weight w: the
        guidance's, or `token_weights` (B, N), one per token (a weight that varies over the groups)."""
        if guidance.kind in ("z_cfg", "xz_cfg"):                        # guide in feature space
            z_c, z_u = z.chunk(2)
            z = z_u + guidance.w_z * (z_c - z_u)
        z = z.reshape(-1, z.shape[-1])                                  # (B N, W); cfg: (2 B N, W)
        if guidance.kind in ("x_cfg", "xz_cfg"):                        # the head at z and at 0
            z = torch.cat([z, torch.zeros_like(z)])
        if token_weights is not None:
            return self.cond_embed(z), token_weights.reshape(-1, 1).float()  # (B N, 1)
        w = guidance.cfg if guidance.kind == "cfg" else guidance.w_x
        return self.cond_embed(z), torch.tensor(w, device=z.device)     # once, not per step

    def evaluate(self, x, t, cz, kind, w):
        """Guided output (N, out_dim) at x (N, D) and time t (0-d tensor) under the embedded
        conditions cz: [cond; uncond] for cfg, [z; 0] for x-CFG, both in one head call."""
        c = cz + self.time_embed(t.reshape(1))                          # (N or 2N, width)
        if kind not in ("cfg", "x_cfg", "xz_cfg"):
            return self(x, c).float()
        a, b = self(torch.cat([x, x]), c).float().chunk(2)              # conditional, unconditional
        return self.guide(a, b, w)

    def guide(self, a, b, w):
        """b + w (a - b): the unconditional output moved w times toward the conditional one."""
        return b + w * (a - b)


class FlowHead(MLPHead):
    """Per-token velocity v(x_t, t, z), the flow-matching loss, and the guided ODE sampler."""

    def __init__(self, config):
        super().__init__(config, config.token_dim)
        self.train_time = config.train_time
        self.train_time_loc, self.train_time_scale = config.train_time_loc, config.train_time_scale
        self.time_schedule, self.time_shift = config.time_schedule, config.time_shift
        self.x_prediction, self.x_pred_eps = config.head_prediction == "x", config.x_pred_eps

    def velocity(self, out, x_t, t):
        """The velocity from the network's output at x_t (N, D), times t (N,) or 0-d: the output
        itself, or under x-prediction (x_hat - x_t) / (1 - t), 1 - t clipped at x_pred_eps."""
        if not self.x_prediction:
            return out
        one_minus_t = (1 - t).clamp_min(self.x_pred_eps)
        return (out - x_t.float()) / (one_minus_t[:, None] if one_minus_t.dim() else one_minus_t)

    def evaluate(self, x, t, cz, kind, w):
        """The guided velocity at x (N, D), time t (0-d). Guidance mixes the outputs linearly, so under
        x-prediction guiding x_hat then converting equals converting each branch then guiding."""
        return self.velocity(super().evaluate(x, t, cz, kind, w), x, t)

    # ---- training -----------------------------------------------------------------------
    def _train_times(self, n, device):
        if self.train_time == "logit_normal":                           # SD3's logit-normal, m=0 s=1
            return torch.sigmoid(self.train_time_loc + self.train_time_scale * torch.randn(n, device=device))
        return torch.rand(n, device=device)

    def loss(self, z, target):
        """Per-token loss (B, L): ||v(x_t, t, z) - (x - e)||^2 with x_t = t x + (1 - t) e."""
        B, L, _ = z.shape
        z, x = self._train_inputs(z, target)                            # (m B L, W), (m B L, D)
        t = self._train_times(x.shape[0], x.device)                     # (m B L,)
        e = torch.randn_like(x)
        x_t = t[:, None] * x + (1 - t[:, None]) * e
        v = self.velocity(self(x_t, self.condition(t, z)).float(), x_t, t)  # (m B L, D)
        loss = (v - (x - e)).pow(2).mean(-1)                            # (m B L,)
        return loss.view(self.batch_mul, B, L).mean(0)                  # (B, L)

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

    def ode_step(self, x, t0, t1, cz, kind, w, solver):
        """x (N, D) at t0 carried to t1 (0-d tensors) by one step of `solver`."""
        dt = t1 - t0
        v0 = self.evaluate(x, t0, cz, kind, w)                          # (N, D)
        if solver == "euler":
            return x + dt * v0
        if solver == "midpoint":
            return x + dt * self.evaluate(x + dt / 2 * v0, t0 + dt / 2, cz, kind, w)
        v1 = self.evaluate(x + dt * v0, t1, cz, kind, w)                # heun: the trapezoid
        return x + dt / 2 * (v0 + v1)

    def step_solvers(self, steps, solver="euler"):
        """The solver of each ODE step: `solver` throughout, except that under x-prediction the Heun
        step ending at t = 1 is Euler (the module's docstring: a Heun correction with the clipped
        1 - t there leaves a share of the noise in every sample)."""
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
        last = "euler" if self.x_prediction and solver == "heun" else solver
        return [solver] * (steps - 1) + [last]

    def nfe(self, steps, solver="euler", mode="ode"):
        """Velocity evaluations (head calls) of one sample(): 1 for one_step, one per Euler step and
        two per Heun or midpoint step (`step_solvers`)."""
        if mode == "one_step":
            return 1
        return sum(1 if s == "euler" else 2 for s in self.step_solvers(steps, solver))

    def sample(self, z, noise, steps, guidance=None, mode="ode", *, solver="euler", temperature=1.0,
               compile_head=False, step_noise=None, token_weights=None):
        """Tokens (B, N, D) from conditions z (B, N, W), or (2B, N, W) [cond; uncond] when the
        guidance needs the unconditional backbone, integrating from temperature x noise (B, N, D).

        `mode` 'one_step' is the clean estimate e + v(e, 0), one evaluation; `compile_head`
        runs each step compiled on CUDA; `step_noise` is for ancestral heads (the ODE takes none);
        `token_weights` (B, N) replace the guidance's weight token by token.
        """
        guidance = guidance or Guidance()
        B, N, D = noise.shape
        cz, w = self.guidance_inputs(z, guidance, token_weights)
        x = temperature * noise.reshape(B * N, D).float()
        if mode == "one_step":
            t0 = torch.zeros((), device=x.device)
            return (x + self.evaluate(x, t0, cz, guidance.kind, w)).view(B, N, D)
        if mode != "ode":
            raise ValueError(f"unknown sampling mode {mode!r}")
        solvers = self.step_solvers(steps, solver)                      # rejects an unknown solver
        ts = self.time_grid(steps, x.device)                            # (steps + 1,)
        step = compiled(FlowHead.ode_step, x.device) if compile_head else FlowHead.ode_step
        for i, step_solver in enumerate(solvers):                       # t = 0 -> 1
            x = step(self, x, ts[i], ts[i + 1], cz, guidance.kind, w, step_solver)
        return x.view(B, N, D)
