"""Making and scoring images. Imports `core`, `data` and `train` (checkpoints).

    sampling.py         the evaluation set: seeds, the Ray Data actor pool, the PNG/NPZ layout, grids
    fidelity.py         FID / IS / precision / recall with torch-fidelity's Inception, reference statistics
    domain.py           the domain evaluator as a torch-fidelity feature extractor, its file and scorer
    domain_training.py  training the domain evaluator on a dataset's own images
    scoring.py          scoring a finished sample set, as `sar fid` does, and its summary line
    during_training.py  in-training evaluation: a fixed small set sampled and scored every N steps
"""
