"""Entry points: the `sar` command line, the typed config, and one thin module per stage.

    cli.py      the `sar` command line          parser.py   its subcommands, options and help
    config.py   every stage's pydantic config   stages.py   the table of stages and StageOptions
    encode.py, pretrain.py, refine.py, sample.py, fid.py    the stages: each says what it reads
                and writes, `status(cfg)` (up to date?) and `main(cfg, options, tracker)` (and
                `tracked(cfg)` where its run logs more than its record), and imports no other
                stage; its output folder is `cfg.output_of(stage)`; the work itself is library code
    run.py      `sar run`: a plain loop over the stages; the tracked runs of a command and its stages
    demo.py     `sar demo`                      report.py   `sar report`: a run directory's report.html
    submit.py   `sar submit`: any command as a Ray Job on a cluster
"""

import os

# Ray reads this when it is imported: under `uv run` it would otherwise ship the caller's folder
# and build a fresh virtual environment for every worker. Workers use the environment they were
# started in (this one locally; the cluster image's on a cluster, see docs/cluster.md).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
