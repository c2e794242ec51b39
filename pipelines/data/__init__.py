"""Images in, latent shards out: the data formats and the encode stage. Imports `core` only.

    imagenet.py     the ImageNet layout: which files make a split, and their labels
    preprocess.py   read, decode and centre-crop images (a Ray Data CPU stage)
    codecs.py       token spaces: raw pixels, KL-VAE, Wan VAE (ldm_vae.py converts LDM checkpoints)
    latents.py      the latent schema, Parquet shards, the manifest and its commit protocol
    stream.py       each Train worker's read of large latents: every row once per epoch, resumable mid-epoch
    encode.py       the encode stage's Ray Data pipeline and its driver
    synth.py        a procedural ImageNet-layout dataset (the demo's)
    synth_latents.py  a synthetic latents dataset at ImageNet's KL-16 shape, without images (data path at size)
    mnist.py        MNIST's 5,000 packaged digits as an ImageNet-layout folder with train / val / test
"""
