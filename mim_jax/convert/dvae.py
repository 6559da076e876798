"""DALL-E dVAE encoder (openai/DALL-E `encoder.pkl`) -> Flax params.

The official file pickles the whole torch module; its state dict has keys
such as `blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w` and
`blocks.output.conv.b` (the repo's own Conv2d names its tensors `w`, `b`).
"""

import numpy as np

from mim_jax.convert import core

RULES = [
    ('blocks.input.', 'input/'),
    ('blocks.group_{g}.block_{b}.', 'group_{g}_block_{b}/'),
    ('blocks.output.conv.', 'output/'),
]


def _torch_names(state_dict) -> dict:
  """`.w` / `.b` -> `.weight` / `.bias`, the names the rules engine knows."""
  out = {}
  for k, v in state_dict.items():
    stem, _, leaf = k.rpartition('.')
    leaf = {'w': 'weight', 'b': 'bias'}.get(leaf, leaf)
    out[f'{stem}.{leaf}'] = v
  return out


def load_encoder_pkl(path: str) -> dict[str, np.ndarray]:
  """State dict of an `encoder.pkl` (a pickled module) or of a .pth/.npz.

  The official file is a full pickle, so it is read with
  `torch.load(weights_only=False)`: only load files from a source you trust.
  """
  if path.endswith('.pkl'):
    import torch  # pylint: disable=g-import-not-at-top
    module = torch.load(path, map_location='cpu', weights_only=False)
    sd = module.state_dict() if hasattr(module, 'state_dict') else module
    return {k: v.detach().float().numpy() for k, v in sd.items()}
  return core.load_state_dict(path)


def to_flax(state_dict, params):
  """Official encoder state dict -> params shaped like `params`.

  Raises:
    core.ConversionError naming unknown, missing and mis-shaped keys (a file
    of another architecture).
  """
  return core.torch_to_flax(_torch_names(state_dict), params, RULES)
