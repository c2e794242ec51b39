"""The DDPM head: the self-token paper's diffusion ablation (Table 3: DDPM FID 29.48 vs flow matching 3.56).

The flow head's MLP (same modules, so the state-dict keys match) trained with MAR's diffusion
loss: epsilon prediction on the cosine schedule over 1000 steps (Nichol & Dhariwal 2021), the
variance learned in the range [posterior variance, beta] (IDDPM's learned range, MAR's
`learn_sigma`, so the output is 2 x D), and the hybrid loss L_simple + L_vlb, the bound
training only the variance. The time input is the step index, as MAR embeds it.

Sampling is MAR's: ancestral steps over the schedule respaced to `steps` timesteps (IDDPM's
`space_timesteps`), `temperature` scaling the noise of every step (MAR's p_sample; the initial
noise stays standard). Guidance acts on the predicted epsilon, v_u + w (v_c - v_u) as the flow
head, the variance coming from the conditional branch (MAR's forward_with_cfg).

The first step of a respaced chain, at t = 999 where abar is ~2.4e-9 (the cosine betas are
clipped at 0.999), multiplies the epsilon error by sqrt(1 / abar_999 - 1) x coef1, about
2e4 x sqrt(abar at the chain's next step): ~620 with 50 steps, ~31 with all 1000. The head
needs a precise epsilon at the noisiest step (as MAR's long training gives) or many steps.

`mode="one_step"` is the clean estimate x_0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) at the
noisiest step T = 999 from x_T = the noise, one evaluation: the analogue of the flow head's
e + v(e, 0). Under the cosine schedule sqrt(abar_T) is about 5e-5, so the estimate multiplies an
epsilon error by about 2e4; the ancestral modes are the usable ones for refinement.
"""
import math

import torch

from .flow_head import MLPHead, compiled
from .guidance import Guidance

DIFFUSION_STEPS = 1000  # MAR / IDDPM training steps
# Rows of NoiseSchedule.table.
SQRT_AC, SQRT_1M_AC, SQRT_RECIP_AC, SQRT_RECIPM1_AC, LOG_BETA, POST_LOGVAR, COEF1, COEF2, TIME = range(9)


def cosine_betas(steps=DIFFUSION_STEPS, max_beta=0.999):
    """Betas (steps,) float64 of the cosine schedule abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)],
                        dtype=torch.float64)


def space_timesteps(num_timesteps, steps):
    """IDDPM's evenly spaced subset of `steps` training timesteps, first and last included."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"a DDPM head samples with 1..{num_timesteps} steps, not {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(i * stride) for i in range(steps)})


class NoiseSchedule:
    """IDDPM's tables of a beta schedule on its timesteps, computed in float64 (GaussianDiffusion)."""

    def __init__(self, betas, timesteps):
        self.betas, self.timesteps = betas, list(timesteps)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        # The posterior variance is 0 at the first step: its log is clipped to the next one.
        post_logvar = torch.cat([post_var[1:2], post_var[1:]]).log() if len(betas) > 1 else betas.log()
        self.alphas_cumprod = ac
        self.table = torch.stack([
            ac.sqrt(), (1 - ac).sqrt(), (1 / ac).sqrt(), (1 / ac - 1).sqrt(), betas.log(), post_logvar,
            betas * ac_prev.sqrt() / (1 - ac), (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
            torch.tensor(self.timesteps, dtype=torch.float64) / DIFFUSION_STEPS,
        ])                                                              # (9, steps)
        self._device_tables = {}

    @classmethod
    def cosine(cls):
        return cls(cosine_betas(), range(DIFFUSION_STEPS))

    def respaced(self, steps):
        """The schedule on `steps` timesteps: betas recomputed from abar there (IDDPM respacing)."""
        use = space_timesteps(len(self.betas), steps)
        ac = self.alphas_cumprod[use]
        return NoiseSchedule(1 - ac / torch.cat([ac.new_ones(1), ac[:-1]]), [self.timesteps[i] for i in use])

    def on(self, device):
        """The table (9, steps) as float32 on `device` (copied once per device)."""
        device = torch.device(device)
        if device not in self._device_tables:
            self._device_tables[device] = self.table.float().to(device)
        return self._device_tables[device]


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of a Gaussian integrated over bins of width 2/255 on [-1, 1] (IDDPM's decoder term)."""
    def cdf(v):                                                         # tanh approximation of Phi
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMHead(MLPHead):
    """Per-token epsilon and variance (x_t, t, z), MAR's diffusion loss, and guided ancestral sampling."""

    def __init__(self, config):
        super().__init__(config, 2 * config.token_dim)              # epsilon and the variance fraction
        self.schedule = NoiseSchedule.cosine()
        self._respaced = {}

    def p_mean_logvar(self, x_t, out, c):
        """Mean and log-variance of p(x_{t-1} | x_t) from the output (N, 2D) = (eps, v) and the
        schedule rows c at t; also the clean estimate x_0."""
        eps, frac = out.chunk(2, -1)
        frac = (frac + 1) / 2                                           # v in [-1, 1] -> [min, max]
        logvar = frac * c[LOG_BETA] + (1 - frac) * c[POST_LOGVAR]
        x0 = c[SQRT_RECIP_AC] * x_t - c[SQRT_RECIPM1_AC] * eps
        return c[COEF1] * x0 + c[COEF2] * x_t, logvar, x0

    # ---- training -----------------------------------------------------------------------
    def loss(self, z, target):
        """Per-token loss (B, L): ||eps - eps(x_t, t, z)||^2 + the variational bound term (bits)."""
        B, L, _ = z.shape
        z, x = self._train_inputs(z, target)                            # (m B L, W), (m B L, D)
        t = torch.randint(0, DIFFUSION_STEPS, (x.shape[0],), device=x.device)
        c = self.schedule.on(x.device)[:, t, None]                      # (9, m B L, 1)
        e = torch.randn_like(x)
        x_t = c[SQRT_AC] * x + c[SQRT_1M_AC] * e
        out = self(x_t, self.condition(c[TIME, :, 0], z)).float()       # (m B L, 2 D)
        eps, var = out.chunk(2, -1)
        mse = (e - eps).pow(2).mean(-1)                                 # (m B L,)
        # The bound trains the variance only: the mean comes from the detached epsilon.
        mean, logvar, _ = self.p_mean_logvar(x_t, torch.cat([eps.detach(), var], -1), c)
        true_mean = c[COEF1] * x + c[COEF2] * x_t
        kl = normal_kl(true_mean, c[POST_LOGVAR], mean, logvar).mean(-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x, mean, 0.5 * logvar).mean(-1) / math.log(2.0)
        loss = mse + torch.where(t == 0, nll, kl)                       # (m B L,)
        return loss.view(self.batch_mul, B, L).mean(0)                  # (B, L)

    # ---- sampling -----------------------------------------------------------------------
    def guide(self, a, b, w):
        """Guided epsilon b + w (a - b); the variance of the conditional branch a."""
        eps_a, var_a = a.chunk(2, -1)
        eps_b = b[:, :self.token_dim]
        return torch.cat([eps_b + w * (eps_a - eps_b), var_a], -1)

    def respaced(self, steps):
        """The schedule respaced to `steps` (memoised)."""
        if steps not in self._respaced:
            self._respaced[steps] = self.schedule.respaced(steps)
        return self._respaced[steps]

    def ancestral_step(self, x, c, noise, cz, kind, w):
        """x_{t-1} (N, D) from x_t (N, D): the guided p(x_{t-1} | x_t) mean plus its std x noise,
        with c the respaced schedule's column (9,) at t."""
        out = self.evaluate(x, c[TIME], cz, kind, w)                    # (N, 2 D)
        mean, logvar, _ = self.p_mean_logvar(x, out, c)
        return mean + torch.exp(0.5 * logvar) * noise

    def nfe(self, steps, solver="euler", mode="ode"):
        """Head calls of one sample(): 1 for one_step, else one per respaced step."""
        return 1 if mode == "one_step" else len(self.respaced(steps).timesteps)

    def sample(self, z, noise, steps, guidance=None, mode="ode", *, solver="euler", temperature=1.0,
               compile_head=False, step_noise=None, token_weights=None):
        """Tokens (B, N, D) from conditions z as FlowHead.sample, by `steps` ancestral steps from
        noise (B, N, D); `step_noise()` draws each step's fresh noise (B, N, D) (default randn)."""
        if solver != "euler":
            raise ValueError(f"the DDPM head samples ancestrally (MAR); solver {solver!r} is for the flow head")
        guidance = guidance or Guidance()
        B, N, D = noise.shape
        cz, w = self.guidance_inputs(z, guidance, token_weights)
        x = noise.reshape(B * N, D).float()
        if mode == "one_step":
            out = self.evaluate(x, self.schedule.on(x.device)[TIME, -1], cz, guidance.kind, w)
            return self.p_mean_logvar(x, out, self.schedule.on(x.device)[:, -1])[2].view(B, N, D)
        if mode != "ode":
            raise ValueError(f"unknown sampling mode {mode!r}")
        table = self.respaced(steps).on(x.device)                      # (9, steps)
        step_noise = step_noise or (lambda: torch.randn_like(noise))
        step = compiled(DDPMHead.ancestral_step, x.device) if compile_head else DDPMHead.ancestral_step
        for i in reversed(range(table.shape[1])):                      # t = T-1 -> 0; no noise at 0
            e = temperature * step_noise().reshape(B * N, D).float() if i > 0 else torch.zeros_like(x)
            x = step(self, x, table[:, i], e, cz, guidance.kind, w)
        return x.view(B, N, D)
