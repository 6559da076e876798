"""Data helpers for the MAE input pipeline.

Modules:
  augment: image decoding, RandomResizedCrop, flip and normalisation (TF).
  embedded: small photo data sets bundled inside installed packages.
  masks: registry of patch-mask generators that run inside tf.data.
  sources: raw (undecoded) record sources: TFDS, image folders, embedded.
"""
