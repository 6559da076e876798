"""Shared config pieces: the recipe defaults every method starts from, the
tiny-run overrides, and config-file loading with checked overrides.

A method's whole recipe lives in `mim_jax/methods/<m>/config.py`; the files
in `configs/` pick a variant of it.
"""

import copy
import json
import os

import ml_collections
from flax import traverse_util
from ml_collections.config_dict import placeholder

from mim_jax import errors
from mim_jax import sharding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config() -> ml_collections.ConfigDict:
  """What every pretraining recipe shares: ImageNet-1k input, AdamW with the
  MAE-family decay grouping, warmup + cosine, FSDP over every device,
  logging, checkpoints and figures. A method's recipe
  (`mim_jax/methods/<m>/config.py`) sets `model_name`, `model`, `loss` and
  whatever it changes; the values here are the official MAE ones
  (methods.md 2.2; PRETRAIN.md).

  AdamW (0.9, 0.95), wd 0.05 (no decay on biases / norms), blr 1.5e-4 ->
  lr = blr x batch / 256 = 2.4e-3 at batch 4096, 40 warmup epochs then
  half-cycle cosine to 0 over 800 epochs, per-iteration; random 75% masks,
  RandomResizedCrop(224, scale 0.2-1, bicubic) + flip.

  The mask ratio is one field, `input.mask.ratio`: the pipeline's masks and
  the model's token counts both come from it (see `mask_ratio`).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = placeholder(str)
  c.model = dict()
  c.loss = dict()
  c.input = dict(
      data='tfds:imagenet2012', split='train', tfds_data_dir=placeholder(str),
      tfds_manual_dir=placeholder(str), num_train_examples=1_281_167,
      batch_size=4096, image_size=224, crop_scale=(0.2, 1.0),
      crop_ratio=(3 / 4, 4 / 3), hflip=True, mean=IMAGENET_MEAN,
      std=IMAGENET_STD, shuffle_buffer=50_000, cache=False, prefetch=2,
      mask=dict(kind='random', ratio=0.75),
      # Folder sources: undecodable, empty or over-large files are 'skip'ped
      # (logged once by path, counted in train/bad_images) or stop the run
      # ('error'); see mim_jax/data/image_check.py.
      bad_images='skip', max_image_pixels=89_478_485,
      jpeg_draft=False)  # True: big JPEG crops decoded small (docs/speed.md)
  c.lr = placeholder(float)      # absolute lr; overrides base_lr when set
  c.base_lr = 1.5e-4             # lr = base_lr * batch_size / 256
  c.total_epochs = 800.0
  c.total_steps = placeholder(int)
  c.warmup_epochs = 40.0
  c.warmup_steps = placeholder(int)
  # End this run after this step; the schedule still spans total_steps, and
  # a rerun without it continues the same schedule.
  c.stop_after_steps = placeholder(int)
  c.schedule = dict(min_lr=0.0)
  c.optim = dict(name='adamw', b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                 wd_exclude=('bias', 'scale'),
                 grad_clip_norm=placeholder(float), mu_dtype=placeholder(str))
  c.grad_accum_steps = 1
  # Start from a weights file (.pth/.npz/.safetensors; a timm ViT state
  # dict for classifiers) or workdir when the workdir has none;
  # init_strict=False for encoder-only files (random decoder).
  c.init_from = placeholder(str)
  c.init_strict = True
  # Pure FSDP over every device (params, optimizer state, EMA and batch
  # split); data parallelism: (('data', -1),). See tools/plan.py.
  c.mesh = (('data', 1), ('fsdp', -1), ('tensor', 1))
  c.sharding_rules = sharding.DEFAULT_RULES
  c.min_shard_size = sharding.DEFAULT_MIN_SHARD_SIZE
  c.log_every_steps = 100
  # Chip peak TFLOP/s for train/mfu (unset: the known TPU peak of the
  # device kind, train.PEAK_TFLOPS; none on CPUs). train/tflops_per_device
  # is logged either way.
  c.peak_tflops = placeholder(float)
  c.ckpt_every_steps = 1000
  c.keep_ckpts = 3
  c.async_ckpt = True
  # A step with a non-finite loss, gradient, param or optimizer state
  # leaves the state unchanged (checked on the devices every step): 'skip'
  # goes on and stops after max_consecutive_skips such steps in a row,
  # 'stop' stops at the first. No checkpoint ever holds non-finite values.
  c.nonfinite = 'skip'
  c.max_consecutive_skips = 10
  c.vis_every_steps = 5000
  c.vis_images = 8
  # Representation monitor (off: data unset): kNN top-1 of the encoder's
  # features on a small labelled set every `every_steps` (hooks.KnnMonitor).
  c.knn = dict(data=placeholder(str), train_split='train',
               test_split='test', every_steps=placeholder(int), k=20,
               temperature=0.07, feature='cls', batch_size=256,
               crop_pct=1.0, bad_images='error')
  return c


# The model fields of a tiny ViT encoder (tests, CPU demos).
TINY_ENCODER = dict(width=64, depth=4, num_heads=4, mlp_dim=256, patch_size=4)


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run of a tiny model on the embedded photos: 32 px, batch 32, 600
  steps; trains on a 2-core CPU in minutes (the model's size is the
  method's 'tiny' variant)."""
  c.input.data = 'embedded:skimage'
  c.input.num_train_examples = placeholder(int)
  c.input.batch_size = 32
  c.input.image_size = 32
  c.input.shuffle_buffer = 1000
  c.lr = 1.5e-3
  c.total_epochs = placeholder(float)
  c.warmup_epochs = placeholder(float)
  c.total_steps = 600
  c.warmup_steps = 50
  c.log_every_steps = 20
  c.ckpt_every_steps = 200
  c.vis_every_steps = 200
  # The kNN monitor on the embedded handwritten digits (32 px, 899 train /
  # 898 test): about a second per evaluation on a 2-core CPU.
  c.knn.data = 'embedded:digits'
  c.knn.every_steps = 200
  # The recipes compute in bfloat16 (accelerators); CPU runs, the tests
  # and the reference curves (configs/*_curves_tiny.py) in float32.
  c.model.dtype = 'float32'
  return c


def curves_overrides(c: ml_collections.ConfigDict,
                     folder: str) -> ml_collections.ConfigDict:
  """The run of the PyTorch reference curves (tests/fixtures/curves_*_tiny,
  configs/*_curves_tiny.py): the 1,024 photo crops of `folder`, 32 px,
  batch 32 (every image once an epoch: 32 steps), 15 epochs after 2 of
  warmup (480 steps), every step logged (epoch means are then exactly
  upstream's), no kNN monitor."""
  c.input.data = f'folder:{folder}'
  c.input.num_train_examples = 1024
  c.input.batch_size = 32
  c.input.image_size = 32
  c.total_steps = None
  c.warmup_steps = None
  c.total_epochs = 15.0
  c.warmup_epochs = 2.0
  c.log_every_steps = 1
  c.ckpt_every_steps = 480
  c.vis_every_steps = 480
  c.knn.data = None
  return c


def pick(table: dict, variant: str) -> dict:
  """`table[variant]`, or an error listing the recipe's variants."""
  if variant not in table:
    raise errors.ConfigError(f'Unknown variant {variant!r}; this recipe '
                             f'has {sorted(table)}.')
  return table[variant]


def load_config_file(path: str):
  """Loads `get_config(arg)` from 'configs/x.py[:arg]' (as config_flags)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  file, _, arg = path.partition(':')
  if not os.path.exists(file):
    raise errors.ConfigError(f'config file {file!r} does not exist.')
  spec = importlib.util.spec_from_file_location('_mim_jax_config', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def none_for_off(config: ml_collections.ConfigDict):
  """`config` with every string field that reads 'None' set to None.

  A command-line override `--config.knn.data=None` (the natural way to turn
  an optional feature off) reaches a string field as the text 'None'; no
  field takes that text as a value.
  """
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      none_for_off(value)
    elif isinstance(value, str) and value == 'None':
      config[key] = None
  return config


# Fields configs no longer have -> (the field that replaced them, why). A
# config that still sets one (an old config file, a --config. flag) is
# refused with the fix (`check_removed`); the config.json of an older
# workdir is read without them (`upgrade_saved`).
_MASK_RATIO_WHY = (
    'The mask ratio is one field, config.input.mask.ratio: the input '
    "pipeline makes its masks from it, and the method's build_model passes "
    'it to the model, which sizes its visible and masked tokens by it')
REMOVED_FIELDS = {
    'mask_ratio': ('input.mask.ratio', _MASK_RATIO_WHY),
    'model.mask_ratio': ('input.mask.ratio', _MASK_RATIO_WHY),
}

_MISSING = object()


def _lookup(tree, key: str):
  """tree['a']['b'] for key 'a.b' (dicts or ConfigDicts), or _MISSING."""
  node = tree
  for part in key.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or (
        part not in node):
      return _MISSING
    node = node[part]
  return node


def removed_field_error(key: str) -> errors.ConfigError:
  """The error for a config that sets `key`, a REMOVED_FIELDS entry."""
  new, why = REMOVED_FIELDS[key]
  return errors.ConfigError(
      f'config.{key} was removed. {why}. Delete {key!r} from the config '
      f'file and any --config.{key}=... flag, and set {new} instead (e.g. '
      f'`c.{new} = 0.75` in the file or --config.{new}=0.75).')


def check_removed(config) -> None:
  """Refuses a config that still sets a field of REMOVED_FIELDS.

  Raises:
    errors.ConfigError: naming the first such field and its replacement.
  """
  for key in REMOVED_FIELDS:
    if _lookup(config, key) is not _MISSING:
      raise removed_field_error(key)


def mask_ratio(config) -> float:
  """The mask ratio of `config`: `input.mask.ratio`, the one field that
  both the input pipeline (its masks) and the model (build_model passes it
  on; the visible and masked counts follow with `masking.num_visible` /
  `num_masked`) read.

  Raises:
    errors.ConfigError: the config still sets a removed mask field, or has no
      input.mask.ratio.
  """
  check_removed(config)
  ratio = _lookup(config, 'input.mask.ratio')
  if ratio is _MISSING or ratio is None:
    raise errors.ConfigError(
        'config.input.mask.ratio is unset: the model sizes its visible and '
        'masked tokens by it and the pipeline masks with it. Set it (e.g. '
        '0.75), next to block masks with a fixed count too (it must give '
        'the same number of masked patches).')
  return float(ratio)


def upgrade_saved(saved: dict) -> dict:
  """A saved config.json (a dict) in today's layout: the removed fields of
  an older workdir (REMOVED_FIELDS) are dropped, their values kept in the
  field that replaced them.

  Raises:
    errors.ConfigError: a removed field disagrees with its replacement (they
      were references to one value, so a run's config.json never has that).
  """
  out = copy.deepcopy(saved)
  for key, (new, _) in REMOVED_FIELDS.items():
    *parents, last = key.split('.')
    node = _lookup(out, '.'.join(parents)) if parents else out
    if not isinstance(node, dict) or last not in node:
      continue
    old = node.pop(last)
    current = _lookup(out, new)
    if current is _MISSING:
      *parents, last = new.split('.')
      node = out
      for part in parents:
        node = node.setdefault(part, {})
      node[last] = old
    elif current != old:
      raise errors.ConfigError(
          f'the saved config.json has {key}={old!r} but {new}={current!r}; '
          f'{key} was removed and {new} alone holds the value now: set '
          f'{new} in that config.json to the value the run used.')
  return out


def check_overrides(argv: list[str]):
  """Rejects `--config.a.b=v` overrides of keys the config does not have.

  ml_collections would fail deep inside flag parsing with a bare
  AttributeError; this names the key, the known keys there, and the fix
  (for a removed field: the field that replaced it).

  Raises:
    ValueError: for the first unknown or removed key, or a config file
      that sets a removed field.
  """
  config_path = None
  keys = []
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      config_path = a.split('=', 1)[1]
    elif a == '--config' and i + 1 < len(argv):
      config_path = argv[i + 1]
    elif a.startswith('--config.'):
      keys.append(a[len('--config.'):].split('=', 1)[0])
  for key in keys:
    if key in REMOVED_FIELDS:
      raise removed_field_error(key)
  if not config_path or not keys:
    return
  config = load_config_file(config_path)
  check_removed(config)
  for key in keys:
    node = config
    parts = key.split('.')
    for j, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(parts[:j]) or '<top level>'
        known = sorted(node.keys()) if isinstance(
            node, ml_collections.ConfigDict) else []
        raise errors.ConfigError(
            f'Unknown config key {key!r} (in --config.{key}): {where} has no '
            f'field {part!r}. Known fields there: {known}. Fix the spelling, '
            f'or add the field to {config_path.partition(":")[0]}.')
      node = node[part]


# Config fields whose change on resume changes what the checkpoint holds
# (the model, the optimizer's kind and moment dtype): refused.
LAYOUT_FIELDS = ('model_name', 'model.', 'optim.name', 'optim.mu_dtype')
# Model fields that leave the checkpoint as it is: the compute dtype (params
# are float32 whatever it is) and the remat policy (what the backward pass
# recomputes), so a float32, no-remat run of an older recipe resumes under
# the bf16, remat 'linears' one, and the other way round.
NOT_LAYOUT_FIELDS = ('model.dtype', 'model.remat_policy')


def flat_json(config) -> dict:
  """The config as the flat {'a.b': value} of its config.json form (tuples
  become lists), for comparisons with a saved config.json."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return traverse_util.flatten_dict(config, sep='.')


def resume_changes(saved: dict, config) -> tuple[list, list]:
  """Compares a workdir's saved config.json (`saved`, a dict) with the
  config of a resumed run. Fields removed since the run started
  (REMOVED_FIELDS) are no change: `upgrade_saved` moves their values.

  Returns:
    (refused, allowed): 'field: old -> new' lines; refused are the
    LAYOUT_FIELDS, allowed everything else (schedules, intervals, total
    steps, data paths, ...).
  """
  old, new = flat_json(upgrade_saved(saved)), flat_json(config)
  refused, allowed = [], []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, '<unset>'), new.get(key, '<unset>')
    if a == b:
      continue
    line = f'{key}: {a!r} -> {b!r}'
    layout = key not in NOT_LAYOUT_FIELDS and any(
        key == f or (f.endswith('.') and key.startswith(f))
        for f in LAYOUT_FIELDS)
    (refused if layout else allowed).append(line)
  return refused, allowed
