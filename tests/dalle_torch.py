"""The DALL-E dVAE encoder in PyTorch, written from the published
architecture (openai/DALL-E `dall_e/encoder.py`, `dall_e/utils.py`), for
tests: the real weights cannot be downloaded here.

`save_as_official` pickles a module the way `encoder.pkl` is pickled: the
whole module, its classes referenced as `dall_e.encoder.Encoder`,
`dall_e.encoder.EncoderBlock` and `dall_e.utils.Conv2d`.
"""

from collections import OrderedDict
import sys
import types

import torch
from torch import nn as tnn

HID, VOCAB = 16, 32


class TorchConv(tnn.Module):
  """DALL-E's Conv2d: tensors named w and b, 'same' padding."""

  def __init__(self, n_in, n_out, kw):
    super().__init__()
    self.w = tnn.Parameter(torch.randn(n_out, n_in, kw, kw) /
                           (n_in * kw * kw) ** 0.5)
    self.b = tnn.Parameter(torch.randn(n_out) * 0.1)
    self.kw = kw

  def forward(self, x):
    return tnn.functional.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class TorchBlock(tnn.Module):

  def __init__(self, n_in, n_out, n_layers):
    super().__init__()
    n_hid = n_out // 4
    self.post_gain = 1 / n_layers ** 2
    self.id_path = TorchConv(n_in, n_out, 1) if n_in != n_out else (
        tnn.Identity())
    self.res_path = tnn.Sequential(OrderedDict([
        ('relu_1', tnn.ReLU()), ('conv_1', TorchConv(n_in, n_hid, 3)),
        ('relu_2', tnn.ReLU()), ('conv_2', TorchConv(n_hid, n_hid, 3)),
        ('relu_3', tnn.ReLU()), ('conv_3', TorchConv(n_hid, n_hid, 3)),
        ('relu_4', tnn.ReLU()), ('conv_4', TorchConv(n_hid, n_out, 1))]))

  def forward(self, x):
    return self.id_path(x) + self.post_gain * self.res_path(x)


class TorchEncoder(tnn.Module):

  def __init__(self, n_hid=HID, vocab=VOCAB, groups=4, per_group=2):
    super().__init__()
    n_layers = groups * per_group
    widths = [n_hid * 2 ** g for g in range(groups)]
    parts = [('input', TorchConv(3, n_hid, 7))]
    n_in = n_hid
    for g, width in enumerate(widths, 1):
      blocks = [(f'block_{b}', TorchBlock(n_in if b == 1 else width, width,
                                          n_layers))
                for b in range(1, per_group + 1)]
      if g < groups:
        blocks.append(('pool', tnn.MaxPool2d(kernel_size=2)))
      parts.append((f'group_{g}', tnn.Sequential(OrderedDict(blocks))))
      n_in = width
    parts.append(('output', tnn.Sequential(OrderedDict([
        ('relu', tnn.ReLU()), ('conv', TorchConv(n_in, vocab, 1))]))))
    self.blocks = tnn.Sequential(OrderedDict(parts))

  def forward(self, x):
    return self.blocks(x)



_OFFICIAL = {TorchEncoder: ('dall_e.encoder', 'Encoder'),
             TorchBlock: ('dall_e.encoder', 'EncoderBlock'),
             TorchConv: ('dall_e.utils', 'Conv2d')}


def save_as_official(module: tnn.Module, path: str):
  """torch.save(module) with the classes named as in the `dall_e` package,
  which is then forgotten again: loading needs the stand-in unpickler."""
  saved = {c: (c.__module__, c.__name__, c.__qualname__) for c in _OFFICIAL}
  fake = {'dall_e': types.ModuleType('dall_e')}
  for cls, (mod, name) in _OFFICIAL.items():
    fake.setdefault(mod, types.ModuleType(mod))
    setattr(fake[mod], name, cls)
    cls.__module__, cls.__name__, cls.__qualname__ = mod, name, name
  sys.modules.update(fake)
  try:
    torch.save(module, path)
  finally:
    for cls, (mod, name, qual) in saved.items():
      cls.__module__, cls.__name__, cls.__qualname__ = mod, name, qual
    for mod in fake:
      sys.modules.pop(mod, None)
