"""The SAR generator as torch modules: device-agnostic, no I/O, no Ray.

    grouping.py   token groupings G_1..G_T and their dependency injections h(G_<t)
    sar.py        SARConfig, the group-causal backbone, SARModel (one-pass training, KV-cached
                  generation) and the size presets
    flow_head.py  the flow-matching head: velocity MLP, loss and ODE sampler
    guidance.py   CFG, z-CFG, x-CFG and x+z-CFG
"""
from .flow_head import FlowHead
from .grouping import GROUPINGS, Grouping, make_grouping
from .guidance import GUIDANCE_KINDS, Guidance
from .sar import (PRESETS, Backbone, KVCache, SARConfig, SARModel, build_model, count_parameters,
                  group_causal_mask, preset_config)

__all__ = ["GROUPINGS", "GUIDANCE_KINDS", "Grouping", "make_grouping", "PRESETS", "Backbone", "FlowHead",
           "Guidance", "KVCache", "SARConfig", "SARModel", "build_model", "count_parameters", "group_causal_mask",
           "preset_config"]
