"""`sar report`: the run report of a run directory, one self-contained HTML page.

Reads   whatever `{run_dir}` holds, each part optional (pipelines/report/page.py lists the files), and
        the config, for the run's plan (`sar plan`'s figures).
Writes  `{run_dir}/report.html` (atomically; images embedded, nothing fetched from the network).
Launch  sar report --config FILE [--set run_dir=DIR]; `sar run` and `sar demo` write it when they end,
        and add it to the run directory's MLflow run.
"""

from __future__ import annotations

from jobs.config import PipelineConfig
from pipelines.core import storage, tracking
from pipelines.core.errors import SarError
from pipelines.report.page import write_report
from pipelines.train.plan import plan_of


def main(cfg: PipelineConfig, tracker: tracking.Tracker = tracking.NULL) -> int:
    if not storage.exists(cfg.run_dir, cfg.data.storage_options):
        raise SarError(f"no run directory at {storage.redact(cfg.run_dir)}: set run_dir (--config, "
                       f"--set run_dir=DIR) to one that `sar run` or a stage wrote")
    url = write_report(cfg.run_dir, cfg.outputs(), cfg.data.storage_options, plan=plan_of(cfg))
    tracker.log_artifact(url)
    print(f"report: {storage.redact(url)}", flush=True)
    return 0
