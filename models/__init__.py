"""The SAR generator as torch modules: device-agnostic, no I/O, no Ray.

    grouping.py   token groupings G_1..G_T and their dependency injections h(G_<t)
    sar.py        SARConfig, the group-causal backbone, SARModel (one-pass training, KV-cached
                  generation) and the size presets
    flow_head.py  the head's MLP; the flow-matching head: velocity, loss and ODE solvers
    ddpm_head.py  the DDPM head (the paper's Table 3 ablation): MAR's diffusion loss, ancestral sampling
    guidance.py   CFG, z-CFG, x-CFG and x+z-CFG
"""
from .ddpm_head import DDPMHead
from .flow_head import SOLVERS, FlowHead
from .grouping import GROUPINGS, INJECTIONS, SCALE_SCHEDULES, Grouping, make_grouping, resolve_scales
from .guidance import GUIDANCE_KINDS, Guidance
from .sar import (HEADS, PRESETS, Backbone, KVCache, SARConfig, SARModel, build_model, count_parameters,
                  group_causal_mask, preset_config)

__all__ = ["GROUPINGS", "GUIDANCE_KINDS", "HEADS", "INJECTIONS", "SCALE_SCHEDULES", "SOLVERS", "Grouping",
           "make_grouping", "resolve_scales", "PRESETS", "Backbone", "DDPMHead", "FlowHead", "Guidance", "KVCache",
           "SARConfig", "SARModel", "build_model", "count_parameters", "group_causal_mask", "preset_config"]
