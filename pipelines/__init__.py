"""The library: the pipeline's layers, each a package whose imports run one way, down this list.

    core/      what every stage stands on: storage (local, s3://, any fsspec URL; atomic writes), errors,
               writer leases, run folders and stage records, progress lines, starting Ray, MLflow tracking
    data/      the ImageNet layout and image decoding, token spaces (codecs), the latent shards and
               their manifest, the encode stage, synthetic and MNIST datasets
    train/     the training stages: objectives, checkpoints, optimisation, the driver (checks, launch,
               record) and the Train worker's loop
    evaluate/  sampling (the Ray Data actor pool), FID / IS / precision / recall (torch-fidelity), the
               domain evaluator, in-training evaluation, scoring a finished set
    report/    the run report: a run directory read and drawn as one HTML page

A layer imports only the layers above it in this list (tests/test_layout.py checks it); `train`
calls the in-training evaluation through a protocol (train/loop_config.py), not an import.
Library functions take the config's sections (jobs/config.py's pydantic models) as plain objects;
nothing here imports `jobs`.
"""
