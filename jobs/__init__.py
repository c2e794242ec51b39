"""Entry points of the pipeline's stages and their configuration."""

import os

# Ray reads this when it is imported: under `uv run` it would otherwise ship the caller's folder
# and build a fresh virtual environment for every worker. Workers use the environment they were
# started in (this one locally; the cluster image's on a cluster, see docs/cluster.md).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
