"""What every stage stands on; imports nothing else of the library.

    errors.py       SarError and DatasetMismatch: a failure the user can act on, in one line
    storage.py      every read and write: local paths, s3:// and any fsspec protocol, atomically
    lease.py        writer leases: one process at a time writes a stage's output folder
    rundir.py       run folders: the config a run is bound to, stage records, archiving stale outputs
    progress.py     progress lines of encode, sample and training (redrawn on a terminal)
    ray_runtime.py  starting or joining Ray the same way in every stage
    tracking.py     MLflow runs: one per run directory, one nested per stage, queued off the caller
"""
