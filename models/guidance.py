"""Classifier-free guidance of the self-token paper (Fig. 12, Table 2): CFG, z-CFG, x-CFG and x+z-CFG.

With C the backbone cost and c the head cost of one AR step:
    none    v(x, z_c)                                                    C + c
    cfg     v = v_u + cfg (v_c - v_u), the head at z_c and at z_u          2C + 2c
    z_cfg   z = z_u + w_z (z_c - z_u), then the head once                  2C + c
    x_cfg   v = v_0 + w_x (v_z - v_0), the head at z and at z = 0          C + 2c
    xz_cfg  both: z-CFG in feature space, then x-CFG in the head           2C + 2c
z_u comes from the unconditional backbone (the null class, trained by class dropout); the
head at z = 0 is the unconditional head branch (trained by z dropout).
"""
from dataclasses import dataclass, replace

from .choices import GUIDANCE_KINDS


@dataclass(frozen=True)
class Guidance:
    """Which guidance and its weights; `ramp` grows them linearly over the AR steps (MAR's linear cfg)."""

    kind: str = "none"
    cfg: float = 1.0
    w_x: float = 1.0
    w_z: float = 1.0
    ramp: bool = False

    def __post_init__(self):
        if self.kind not in GUIDANCE_KINDS:
            raise ValueError(f"unknown guidance {self.kind!r}; choose from {GUIDANCE_KINDS}")

    @property
    def needs_uncond_backbone(self) -> bool:
        """The unconditional backbone pass is paid only by cfg, z_cfg and xz_cfg."""
        return self.kind in ("cfg", "z_cfg", "xz_cfg")

    @property
    def head_calls(self) -> int:
        """Head branches per evaluation: two for cfg, x_cfg and xz_cfg, batched into one head call."""
        return 2 if self.kind in ("cfg", "x_cfg", "xz_cfg") else 1

    def at_step(self, t: int, num_groups: int) -> "Guidance":
        """The weights used at AR step t: w_t = 1 + (w - 1) (t + 1) / T with `ramp`, else w."""
        if not self.ramp:
            return self
        f = (t + 1) / num_groups
        return replace(self, cfg=1 + (self.cfg - 1) * f, w_x=1 + (self.w_x - 1) * f,
                       w_z=1 + (self.w_z - 1) * f, ramp=False)
