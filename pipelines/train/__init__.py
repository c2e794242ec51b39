"""The training stages (pretrain and refine). Imports `core` and `data`.

    objectives.py   teacher forcing (pretrain) and self-autoregressive refinement (refine)
    checkpoints.py  self-describing checkpoints: written by training, read by refine, sample and the report
    optim.py        AdamW groups, the warm-up schedule, torch's EMA, FSDP2 sharding
    loop_config.py  LoopConfig: what the driver hands every worker (frozen), the files the loop writes
    driver.py       runs in the stage's process: checks, the run folder, the Ray Train launch, the record
    worker.py       runs in each Train worker: the loop and its steps
    curves.py       the training curves (loss.png)
    plan.py         what a run will read, write and take, before it runs (`sar plan`, the report's plan)
"""
