"""Data helpers for the MAE input pipeline.

Modules:
  augment: image decoding, RandomResizedCrop, flip and normalisation (TF).
  embedded: small photo data sets bundled inside installed packages.
  masks: registry of patch-mask generators that run inside tf.data.
  seeds: stateless RNG key derivation (seed, domain, step, index).
  sources: raw (undecoded) record sources: TFDS, image folders, embedded.
"""
