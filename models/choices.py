"""The names a config may choose among, as plain tuples: no torch, so the pipeline's config
(jobs/config.py) validates against them without loading the modules that implement them."""

GROUPINGS = ("next-token", "next-row", "next-layer", "next-neighbour", "next-scale")  # grouping.py, DESIGN 3
INJECTIONS = ("avg", "se")                   # next-neighbour's dependency injection h (grouping.py)
SCALE_SCHEDULES = ("powers-of-two", "var-10")  # named next-scale schedules (grouping.resolve_scales)
GUIDANCE_KINDS = ("none", "cfg", "z_cfg", "x_cfg", "xz_cfg")  # guidance.py, self-token paper Fig. 12
SOLVERS = ("euler", "heun", "midpoint")      # the flow head's ODE solvers (flow_head.py)
HEADS = ("flow", "ddpm")                     # the per-token heads (flow_head.py, ddpm_head.py)
HEAD_PREDICTIONS = ("v", "x")               # what the flow head outputs: the velocity or the clean token
