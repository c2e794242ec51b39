"""Images in, latent shards out: the data formats and the encode stage. Imports `core` only.

    imagenet.py     the ImageNet layout: which files make a split, and their labels
    preprocess.py   read, decode and centre-crop images (a Ray Data CPU stage)
    codecs.py       token spaces: raw pixels, KL-VAE, Wan VAE (ldm_vae.py converts LDM checkpoints)
    latents.py      the latent schema, Parquet shards, the manifest and its commit protocol
    encode.py       the encode stage's Ray Data pipeline and its driver
    synth.py        a procedural ImageNet-layout dataset (the demo's)
    mnist.py        MNIST's 5,000 packaged digits as an ImageNet-layout folder with train / val / test
"""
