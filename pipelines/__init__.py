"""The library: Ray Data stages, the Ray Train loop, storage and data formats, checkpoints, evaluation.

    storage.py      every read and write: local paths, s3:// and any fsspec protocol, atomically
    lease.py        writer leases: one process at a time writes a stage's output folder
    imagenet.py     the ImageNet layout: which files make a split, and their labels
    preprocess.py   read, decode and centre-crop images (Ray Data CPU stage)
    codecs.py       token spaces: raw pixels, KL-VAE, Wan VAE (ldm_vae.py converts LDM checkpoints)
    encode.py       the encode stage's Ray Data pipeline and its driver
    latents.py      the latent schema, Parquet shards, the manifest and its commit protocol
    objectives.py   teacher forcing (pretrain) and self-autoregressive refinement (refine)
    training.py     the Ray Train loop both training stages share
    checkpoints.py  self-describing checkpoints
    rundir.py       run-directory binding, stage status and records, archiving stale outputs
    sampling.py     the evaluation set: seeds, the Ray Data actor pool, PNG/NPZ layout
    fid.py          FID / IS / precision / recall with torch-fidelity
    plots.py        training curves;  synth.py  a procedural ImageNet-layout dataset
    tracking.py     MLflow runs: one per run directory, one nested per stage, queued off the caller
    report.py       the run report: one self-contained HTML page of a run directory
    progress.py     progress lines of encode, sample and training (redrawn on a terminal)
    ray_runtime.py  starting or joining Ray

Library functions take the config's sections (jobs/config.py's pydantic models) as plain
objects; nothing here imports `jobs`.
"""
