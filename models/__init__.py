"""The SAR generator as torch modules: device-agnostic, no I/O, no Ray.

    choices.py           the names a config chooses among (groupings, guidance kinds, solvers, ...): no torch
    grouping.py          token groupings G_1..G_T and their dependency injections h(G_<t)
    sar.py               SARConfig, the group-causal backbone, SARModel (one-pass training, KV-cached
                         generation) and the size presets
    flow_head.py         the head's MLP; the flow-matching head: velocity, loss and ODE solvers
    ddpm_head.py         the DDPM head (the paper's Table 3 ablation): MAR's diffusion loss, ancestral sampling
    guidance.py          CFG, z-CFG, x-CFG and x+z-CFG
    domain_classifier.py the domain evaluator's network: a small CNN of a dataset's own images

The names below are imported on first use, so `models.choices` is read without loading torch.
"""

import importlib

_EXPORTS = {
    "DDPMHead": "ddpm_head", "FlowHead": "flow_head", "Grouping": "grouping", "make_grouping": "grouping",
    "resolve_scales": "grouping", "Guidance": "guidance", "Backbone": "sar", "KVCache": "sar", "SARConfig": "sar",
    "SARModel": "sar", "PRESETS": "sar", "build_model": "sar", "count_parameters": "sar",
    "train_flops_per_image": "sar", "group_causal_mask": "sar", "preset_config": "sar",
    "DomainClassifier": "domain_classifier",
    "GROUPINGS": "choices", "GUIDANCE_KINDS": "choices", "HEADS": "choices", "INJECTIONS": "choices",
    "SCALE_SCHEDULES": "choices", "SOLVERS": "choices",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
