"""SAR generator: groupings with dependency injection, group-causal backbone, flow head, guidance."""
from .grouping import GROUPINGS, Grouping, make_grouping
from .sar import (PRESETS, Backbone, FlowHead, Guidance, KVCache, SARConfig, SARModel, build_model,
                  count_parameters, group_causal_mask)

__all__ = ["GROUPINGS", "Grouping", "make_grouping", "PRESETS", "Backbone", "FlowHead", "Guidance",
           "KVCache", "SARConfig", "SARModel", "build_model", "count_parameters", "group_causal_mask"]
