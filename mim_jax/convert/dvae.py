"""DALL-E dVAE encoder (openai/DALL-E `encoder.pkl`) -> Flax params.

The official file pickles the whole torch module; its state dict has keys
such as `blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w` and
`blocks.output.conv.b` (the repo's own Conv2d names its tensors `w`, `b`).
"""

import functools
import pickle
import re
import types

import numpy as np

from mim_jax import errors
from mim_jax.convert import core

# Where the official weights are published (BEiT/CAE download them from
# here); they cannot be fetched from inside mim_jax.
ENCODER_URL = 'https://cdn.openai.com/dall-e/encoder.pkl'
# Where the configs expect it by default (`config.tokenizer.weights`).
DEFAULT_PATH = '~/.cache/mim_jax/dall_e/encoder.pkl'

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


@functools.cache
def _stand_in(module: str, name: str):
  """An empty torch Module subclass standing in for a `dall_e` class.

  Unpickling a torch Module only restores its `__dict__` (parameters,
  submodules, attributes), so the class body is never needed: the file loads
  without the `dall_e` package installed.
  """
  import torch  # pylint: disable=g-import-not-at-top
  return type(name, (torch.nn.Module,), {'__module__': module})


class _Unpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if module == 'dall_e' or module.startswith('dall_e.'):
      return _stand_in(module, name)
    return super().find_class(module, name)


# torch.load(pickle_module=...) wants a module with Unpickler (and load).
_PICKLE = types.ModuleType('mim_jax_dalle_pickle')
_PICKLE.Unpickler = _Unpickler
_PICKLE.load = lambda f, **kw: _Unpickler(f, **kw).load()
_PICKLE.__dict__.update(
    {k: getattr(pickle, k) for k in ('Pickler', 'dump', 'dumps')})


def load_encoder_pkl(path: str) -> dict[str, np.ndarray]:
  """State dict of an `encoder.pkl` (a pickled module) or of a
  .pth/.npz/.safetensors file.

  The official file pickles the whole `dall_e.encoder.Encoder` module. It
  is read with `torch.load(weights_only=False)` and the `dall_e` classes
  replaced by empty stand-ins, so the `dall_e` package is not needed; a
  full pickle can run code, so only load files from a source you trust.
  Local paths and gs:// (tf.io.gfile) both work.

  Raises:
    errors.MissingFileError: no such file.
    errors.WeightsFileError: an empty or damaged file, or one that holds
      no module or state dict.
  """
  if not path.endswith('.pkl'):
    return core.load_state_dict(path)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise errors.MissingFileError(f'tokenizer weights {path!r} do not '
                                  f'exist; the official file is '
                                  f'{ENCODER_URL}.')
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      module = torch.load(f, map_location='cpu', weights_only=False,
                          pickle_module=_PICKLE)
    sd = module.state_dict() if hasattr(module, 'state_dict') else module
    return {k: v.detach().float().numpy() for k, v in sd.items()}
  except Exception as e:  # pylint: disable=broad-except
    # Any failure here is the file's: truncated, not a pickle, a pickle of
    # something else.
    message = core.unreadable(path, e).rstrip('.')
    raise errors.WeightsFileError(f'{message} from {ENCODER_URL}.') from e


def sizes_of(state_dict) -> dict[str, int]:
  """The encoder's architecture read from its tensors: `hidden` (n_hid,
  the input conv's outputs), `groups`, `blocks_per_group` and `vocab_size`
  (the output conv's outputs), as `config.tokenizer` names them.

  Raises:
    core.ConversionError: not a DALL-E encoder (no input / output conv or
      no groups), with the keys found.
  """
  names = _torch_names(state_dict)
  groups = {int(m.group(1)) for k in names
            if (m := re.match(r'blocks\.group_(\d+)\.', k))}
  blocks = {int(m.group(1)) for k in names
            if (m := re.match(r'blocks\.group_1\.block_(\d+)\.', k))}
  try:
    hidden = names['blocks.input.weight'].shape[0]
    vocab = names['blocks.output.conv.weight'].shape[0]
  except KeyError:
    groups = set()
  if not groups or not blocks:
    raise core.ConversionError(
        f'not a DALL-E dVAE encoder: no blocks.input / blocks.group_<g> / '
        f'blocks.output.conv tensors (found {sorted(state_dict)[:8]}); the '
        f'official file is {ENCODER_URL}.')
  return dict(hidden=int(hidden), groups=max(groups),
              blocks_per_group=max(blocks), vocab_size=int(vocab))


def to_flax(state_dict, params):
  """Official encoder state dict -> params shaped like `params`.

  Raises:
    core.ConversionError naming unknown, missing and mis-shaped keys (a file
    of another architecture), with the file's own key names.
  """
  renamed = _torch_names(state_dict)
  try:
    return core.torch_to_flax(renamed, params, RULES)
  except core.ConversionError as e:
    msg = str(e).split('\nCheck that')[0]
    for new, old in zip(renamed, state_dict):
      if new != old:
        msg = re.sub(rf'{re.escape(new)}\b', old, msg)
    raise core.ConversionError(
        f'{msg}\nThis is not the DALL-E dVAE encoder the config describes '
        '(config.tokenizer: hidden, groups, blocks_per_group, vocab_size; '
        f'the official file is {ENCODER_URL}).') from None
