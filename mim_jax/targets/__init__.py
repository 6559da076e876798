"""Targets shared by methods: pixel normalisations (norm-pix and its
per-channel variant), the EMA copy and the frozen dVAE tokenizer providers.
Methods import these; generic code does not need to."""
