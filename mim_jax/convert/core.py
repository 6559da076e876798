"""Generic PyTorch <-> Flax parameter conversion, driven by prefix rules.

A method declares `RULES`: pairs (torch_prefix, flax_prefix) such as
('blocks.{i}.', 'encoder/blocks_{i}/'). `{i}` matches a block index. The rest
of the key maps dots to slashes, and the leaf is renamed by module type:
LayerNorm `weight` <-> `scale`, Linear `weight` (out, in) <-> `kernel`
(in, out), Conv `weight` (O, I, kh, kw) <-> `kernel` (kh, kw, I, O). Other
leaves (cls_token, mask_token, ...) keep their name and layout.

Fixed buffers (the sin-cos position tables) are not Flax params. On import
they are checked against the values our model computes, and on export they
are written, so an exported state dict loads with `strict=True` upstream.
"""

import json
import os
import re
from typing import Iterable, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from mim_jax import errors
from mim_jax.models import vit

Rules = list[tuple[str, str]]


class ConversionError(errors.WeightsFileError):
  """Raised with the full list of unknown, missing and mis-shaped keys: a
  weights file that does not fit the model the config builds (a user
  error, and a ValueError)."""


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r'(\{\w+\})', template)
  rx = ''.join(rf'(?P<{p[1:-1]}>\d+)' if p.startswith('{') else re.escape(p)
               for p in parts)
  return re.compile('^' + rx)


def _map_module(mod: str, rules: Rules, forward: bool) -> Optional[str]:
  """Maps a module path ('blocks.0.attn.qkv') with the prefix rules."""
  sep = '.' if forward else '/'
  out = _map_key(mod + sep, rules, forward)
  return out[:-1] if out else None


def _map_key(key: str, rules: Rules, forward: bool) -> Optional[str]:
  """Maps one key with the first matching rule (or None)."""
  for torch_t, flax_t in rules:
    src, dst = (torch_t, flax_t) if forward else (flax_t, torch_t)
    m = _template_regex(src).match(key)
    if not m:
      continue
    rest = key[m.end():]
    if rest and not (src.endswith('.') or src.endswith('/')):
      continue  # exact-key rule, but the key is longer
    rest = rest.replace('.', '/') if forward else rest.replace('/', '.')
    return dst.format(**m.groupdict()) + rest
  return None


def check_weights_file(path: str) -> None:
  """Cheap checks of a weights file before anything is built: it exists,
  is not empty, and starts as torch.save's zip archive, a legacy pickle, an
  .npz (a zip) or a safetensors file does (a safetensors file must also be
  whole: its header's tensors must fill it exactly).

  Raises:
    errors.MissingFileError / errors.WeightsFileError naming the file and
    the fix.
  """
  if not os.path.exists(path):
    raise errors.MissingFileError(f'checkpoint {path!r} does not exist: '
                                  'check the path.')
  if os.path.isdir(path):
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is a folder, not a .pth/.pt/.npz/.safetensors '
        'file (a transformers folder needs config.json and '
        'model.safetensors).')
  if os.path.getsize(path) == 0:
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is empty (0 bytes): its download or copy did '
        'not finish; fetch it again.')
  if is_safetensors(path):
    safetensors_header(path)
    return
  with open(path, 'rb') as f:
    head = f.read(4)
  if not (head.startswith(b'PK') or head[:1] == b'\x80'):
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is not a PyTorch checkpoint, .npz or '
        f'safetensors file (it starts with {head!r}; torch.save writes a zip '
        'archive): fetch it again, or give a state dict saved with '
        'torch.save, numpy.savez or safetensors.')


def is_safetensors(path: str) -> bool:
  """A .safetensors name, or a file that starts as one (an 8-byte header
  length, then its JSON)."""
  if path.endswith('.safetensors'):
    return True
  with open(path, 'rb') as f:
    head = f.read(9)
  return (len(head) == 9 and head[8:9] == b'{' and
          int.from_bytes(head[:8], 'little') < os.path.getsize(path))


def safetensors_header(path: str) -> tuple[dict, int]:
  """(JSON header, offset of the tensor data) of a safetensors file,
  checked to describe the whole file (a truncated download fails here,
  naming the missing bytes).

  Raises:
    errors.WeightsFileError: not a safetensors file, or truncated.
  """
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    raw = f.read(n) if 8 <= 8 + n <= size else b''
  try:
    header = json.loads(raw)
  except ValueError:
    header = None
  if not isinstance(header, dict):
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is not a whole safetensors file (its {n}-byte '
        f'header does not fit in {size} bytes or is not JSON): it is '
        'truncated or damaged; fetch it again.')
  ends = [t['data_offsets'][1] for k, t in header.items()
          if k != '__metadata__']
  want = 8 + n + max(ends, default=0)
  if want != size:
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is truncated: its header describes {want} '
        f'bytes, the file holds {size}; fetch it again.')
  return header, 8 + n


_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file's tensors as numpy arrays, without pickle (floats
  of 16 bits, bf16 included, become float32).

  Raises:
    errors.WeightsFileError: truncated, damaged, or an unknown dtype.
  """
  header, start = safetensors_header(path)
  with open(path, 'rb') as f:
    f.seek(start)
    data = f.read()
  out = {}
  for key, t in header.items():
    if key == '__metadata__':
      continue
    if t['dtype'] not in _SAFETENSORS_DTYPES:
      raise errors.WeightsFileError(
          f'checkpoint {path!r}: tensor {key!r} has dtype {t["dtype"]}, '
          f'which mim_jax does not read ({sorted(_SAFETENSORS_DTYPES)}).')
    lo, hi = t['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[t['dtype']])
    if hi - lo != int(np.prod(t['shape'])) * dtype.itemsize:
      raise errors.WeightsFileError(
          f'checkpoint {path!r} is damaged: tensor {key!r} ({t["dtype"]} '
          f'{t["shape"]}) spans {hi - lo} bytes; fetch it again.')
    arr = np.frombuffer(data[lo:hi], dtype).reshape(t['shape'])
    out[key] = arr.astype(np.float32) if t['dtype'] in ('F16',
                                                         'BF16') else arr
  return out


def unreadable(path: str, e: Exception) -> str:
  """One line for a weights file torch / numpy cannot read."""
  text = str(e)
  if 'Weights only load failed' in text:
    return (f'checkpoint {path!r} holds pickled objects other than tensors, '
            'and mim_jax reads weights only (torch.load(weights_only=True)), '
            'never code from a file: re-save it as a state dict, '
            'torch.save(model.state_dict(), path), where you trust it.')
  first = (text.strip().splitlines() or [''])[0][:200]
  return (f'checkpoint {path!r} cannot be read ({type(e).__name__}: '
          f'{first}): it is damaged or truncated; fetch it again.')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint (.pth/.pt, via torch.load(weights_only=True)),
  a safetensors file (`load_safetensors`: no torch, no pickle) or a state
  dict saved as .npz. Unwraps {'model': ...} / {'state_dict': ...}
  as written by the official training scripts; their {'model_ema': ...}
  (a timm ModelEma state dict, e.g. BootMAE's momentum encoder) comes back
  as `model_ema.`-prefixed keys.

  Raises:
    errors.MissingFileError: no such file.
    errors.WeightsFileError: an empty, damaged or unreadable file, or one
      that holds no state dict.
  """
  check_weights_file(path)
  if is_safetensors(path):
    return load_safetensors(path)
  try:
    if path.endswith('.npz'):
      with np.load(path) as f:
        return {k: np.asarray(f[k]) for k in f.files}
    import torch  # pylint: disable=g-import-not-at-top
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.WeightsFileError(unreadable(path, e)) from e
  ema = obj.get('model_ema') if isinstance(obj, dict) else None
  for wrapper in ('model', 'state_dict', 'module'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(
        obj[wrapper], dict):
      obj = obj[wrapper]
  if isinstance(ema, dict) and obj is not ema:
    obj = dict(obj, **{f'model_ema.{k}': v for k, v in ema.items()})
  others = (sorted(str(k) for k, v in obj.items()
                   if not hasattr(v, 'is_floating_point'))
            if isinstance(obj, dict) else None)
  if others is None or others:
    what = (type(obj).__name__ if others is None
            else f'entries that are not tensors: {others[:8]}')
    raise errors.WeightsFileError(
        f'checkpoint {path!r} is not a state dict (a dict of tensors, or '
        f"one under 'model' / 'state_dict' / 'module'): it holds {what}. "
        'Give torch.save(model.state_dict(), path).')
  return {k: v.detach().float().numpy() if v.is_floating_point()
          else v.numpy() for k, v in obj.items()}


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str):
  """Writes a state dict as .npz, .safetensors, or as a torch .pth for any
  other suffix (through a temporary name, so a crash leaves no half-written
  file)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  if path.endswith('.npz'):
    with open(tmp, 'wb') as f:
      np.savez(f, **state_dict)
  elif path.endswith('.safetensors'):
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    st.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                 tmp)
  else:
    _save_torch(state_dict, tmp)
  os.replace(tmp, path)


def _save_torch(state_dict: Mapping[str, np.ndarray], path: str):
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.array(v, copy=True))
              for k, v in state_dict.items()}, path)


def _to_flax_leaf(name: str, value: np.ndarray, expected: dict):
  """Renames/transposes a torch leaf for the flax module holding it."""
  if name == 'weight':
    if 'scale' in expected:
      return 'scale', value
    if value.ndim == 2:
      return 'kernel', value.T
    if value.ndim == 4:
      return 'kernel', value.transpose(2, 3, 1, 0)
    return 'kernel', value
  return name, value


def _to_torch_leaf(name: str, value: np.ndarray):
  if name == 'scale':
    return 'weight', value
  if name == 'kernel':
    if value.ndim == 2:
      return 'weight', value.T
    if value.ndim == 4:
      return 'weight', value.transpose(3, 2, 0, 1)
    return 'weight', value
  return name, value


def _host(x):
  """numpy copy of an array leaf; ShapeDtypeStructs (eval_shape) are kept."""
  return x if isinstance(x, jax.ShapeDtypeStruct) else np.asarray(x)


def is_scanned(params, stacked: tuple[str, ...] = vit.STACKED) -> bool:
  """True if the tree uses the nn.scan layout (a `blocks` subtree)."""
  return any(name in k for k in traverse_util.flatten_dict(params)
             for name in stacked)


def _raise_problems(expected: dict, unknown: list, missing: list,
                    mismatched: list, bad_frozen: list, strict: bool):
  """Raises ConversionError listing every problem of a conversion (none:
  returns)."""
  problems = []
  if unknown:
    problems.append(f'unknown keys ({len(unknown)}): {unknown}')
  if missing and strict:
    problems.append(f'missing params ({len(missing)}): {missing}')
  elif any(isinstance(expected[k], jax.ShapeDtypeStruct) for k in missing):
    problems.append(f'missing params ({len(missing)}): {missing}; with '
                    'strict=False, target_params must hold initialised '
                    'values to keep, not shapes')
  if mismatched:
    problems.append(f'shape mismatches ({len(mismatched)}): {mismatched}')
  if bad_frozen:
    problems.append(f'fixed buffers ({len(bad_frozen)}): {bad_frozen}')
  if problems:
    raise ConversionError(
        'Cannot load the state dict into this model:\n  ' +
        '\n  '.join(problems) + '\nCheck that the config (variant, patch '
        'size, image size, decoder) matches the checkpoint; pass strict=False'
        ' to keep freshly initialised values for missing params.')


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target_params,
                  rules: Rules, frozen: Mapping[str, np.ndarray] = (),
                  ignore: Iterable[str] = (), strict: bool = True,
                  frozen_atol: float = 1e-5,
                  stacked: tuple[str, ...] = vit.STACKED):
  """Converts a torch state dict into a Flax params tree.

  Args:
    state_dict: torch key -> array.
    target_params: the Flax params tree (arrays or ShapeDtypeStructs) of the
      model to fill, in either loop or scan layout: it fixes names and shapes.
    rules: the method's (torch_prefix, flax_prefix) rules.
    frozen: torch key -> expected value, for fixed buffers.
    ignore: torch keys (regexes) to skip silently (e.g. optimizer leftovers).
    strict: if False, params absent from the state dict keep the values in
      `target_params` (e.g. an encoder-only checkpoint into a full MAE).
    frozen_atol: tolerance for fixed buffers.
    stacked: names of the block groups that the scan layout stacks.

  Returns:
    A params tree in the layout of `target_params`.

  Raises:
    ConversionError: listing unknown keys, missing params, shape mismatches
      and fixed buffers that differ from ours.
  """
  scanned = is_scanned(target_params, stacked)
  loop_target = vit.scan_to_loop(jax.tree.map(_host, target_params),
                                 stacked) if scanned else target_params
  expected = traverse_util.flatten_dict(loop_target, sep='/')
  modules: dict[str, set] = {}
  for k in expected:
    mod, _, leaf = k.rpartition('/')
    modules.setdefault(mod, set()).add(leaf)

  unknown, mismatched, bad_frozen = [], [], []
  mismatched_paths = set()
  out = {}
  ignore_rx = [re.compile(r) for r in ignore]
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in frozen:
      ref = np.asarray(frozen[key])
      if ref.shape != value.shape or np.abs(ref - value).max() > frozen_atol:
        bad_frozen.append(
            f'{key}: {value.shape} differs from the fixed table {ref.shape}')
      continue
    if any(r.match(key) for r in ignore_rx):
      continue
    mod_t, _, leaf_t = key.rpartition('.')
    mod_f = _map_module(mod_t, rules, forward=True) if mod_t else None
    if mod_f is None:  # a top-level param such as cls_token
      full = _map_key(key, rules, forward=True)
      if full is None:
        unknown.append(key)
        continue
      mod_f, _, leaf_t = full.rpartition('/')
    leaf_f, arr = _to_flax_leaf(leaf_t, value, modules.get(mod_f, set()))
    path = f'{mod_f}/{leaf_f}' if mod_f else leaf_f
    if path not in expected:
      unknown.append(f'{key} (-> {path})')
      continue
    if tuple(arr.shape) != tuple(expected[path].shape):
      mismatched.append(f'{key}: got {tuple(value.shape)}, model wants '
                        f'{tuple(expected[path].shape)} (as {path})')
      mismatched_paths.add(path)
      continue
    out[path] = arr.astype(np.float32)
  # A mis-shaped param is reported as such, not again as missing.
  missing = sorted(set(expected) - set(out) - mismatched_paths)
  _raise_problems(expected, unknown, missing, mismatched, bad_frozen, strict)
  for k in missing:
    out[k] = np.asarray(expected[k])
  tree = traverse_util.unflatten_dict(out, sep='/')
  return vit.loop_to_scan(tree, stacked) if scanned else tree


def flax_to_torch(params, rules: Rules,
                  frozen: Mapping[str, np.ndarray] = (),
                  stacked: tuple[str, ...] = vit.STACKED) -> dict:
  """Inverse of `torch_to_flax`: params tree -> torch state dict (numpy)."""
  params = vit.scan_to_loop(jax.tree.map(np.asarray, params), stacked)
  out = dict(frozen)
  unmapped = []
  for path, value in traverse_util.flatten_dict(params, sep='/').items():
    mod, _, leaf = path.rpartition('/')
    tmod = _map_module(mod, rules, forward=False) if mod else None
    if tmod is None:
      full = _map_key(path, rules, forward=False)
      if full is None:
        unmapped.append(path)
        continue
      out[full] = np.asarray(value)
      continue
    leaf_t, arr = _to_torch_leaf(leaf, np.asarray(value))
    out[f'{tmod}.{leaf_t}'] = arr
  if unmapped:  # the method's rules miss a param of its own model: a bug
    raise ValueError(f'No torch name for params: {unmapped}')
  return out


def torch_grads_to_flax(grads: Mapping[str, np.ndarray], params,
                        rules: Rules,
                        stacked: tuple[str, ...] = vit.STACKED
                        ) -> dict[str, np.ndarray]:
  """Maps a torch-keyed gradient dict onto flat flax paths (loop layout).

  Returns {flax_path: array}. Gradients follow the same layout rules as the
  weights, so this reuses `torch_to_flax` in non-strict mode.
  """
  tree = torch_to_flax(grads, params, rules, strict=False, stacked=stacked)
  return traverse_util.flatten_dict(vit.scan_to_loop(
      jax.tree.map(np.asarray, tree), stacked), sep='/')

