"""Mixup / CutMix with label smoothing, on device inside the train step.

The semantics are timm's `Mixup` (`timm/data/mixup.py`) in mode 'batch' with
`correct_lam=True`, as the MAE/BEiT fine-tuning recipes use it:
- with probability `prob` the batch is mixed at all (else lam = 1);
- if both alphas are > 0, CutMix is used with probability `switch_prob` and
  Mixup otherwise; with one alpha at 0 only the other one is used;
- Mixup draws lam ~ Beta(mixup_alpha, mixup_alpha) and blends each image
  with its partner in the reversed batch: x = lam x + (1 - lam) x.flip(0);
- CutMix draws lam ~ Beta(cutmix_alpha, cutmix_alpha), pastes a box of the
  reversed batch whose sides are sqrt(1 - lam) of the image's, and then sets
  lam to the fraction of pixels left untouched (the box is clipped at the
  borders, so it can be smaller than asked);
- targets = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)).

One lam (and one box) serves the whole batch. Everything is a pure function
of an rng with static shapes, so it jits and runs inside the sharded step.

Partners: `flip(0)` here reverses the *global* batch, as timm does for the
batch of a single process. Under data/FSDP sharding in JAX the batch axis is
one logical array, so example i mixes with example B - 1 - i wherever they
live (XLA moves the data between devices, one collective permute of the
images per step). timm under DDP instead flips each GPU's local batch, so
examples pair within a GPU, and each GPU draws its own lam, mode and box.
Pairs are random either way (the data are shuffled); what differs is that
here one draw serves the whole global batch, as in single-GPU timm. Unlike
timm (which asserts an even batch), an odd batch is accepted: its middle
example is paired with itself, and so is left unchanged by either mix.

lam and the box are drawn in float32 on device, where timm uses float64
numpy; the truncation int(H * sqrt(1 - lam)) can therefore differ by one
pixel at exact boundaries, which changes nothing in distribution.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mim_jax import errors


class MixParams(NamedTuple):
  """One batch's draw.

  Attributes:
    lam: float32 scalar, the weight of the unflipped batch (after CutMix's
      area correction; 1 when nothing is mixed).
    mode: int32 scalar: 0 no mixing, 1 Mixup, 2 CutMix.
    box: (top, left, bottom, right) int32 scalars of the CutMix box, rows
      top..bottom-1 and columns left..right-1 (meaningful for mode 2 only).
  """
  lam: jax.Array
  mode: jax.Array
  box: tuple[jax.Array, jax.Array, jax.Array, jax.Array]


NO_MIX, MIXUP, CUTMIX = 0, 1, 2


def smooth_one_hot(labels: jax.Array, num_classes: int,
                   smoothing: float = 0.0) -> jax.Array:
  """timm's smoothed one-hot: off = smoothing / K, on = 1 - smoothing + off.

  Args:
    labels: int class ids, any shape.
    num_classes: K.
    smoothing: label smoothing in [0, 1).

  Returns:
    float32 array of shape labels.shape + (K,), each row summing to 1.
  """
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return hot * (on - off) + off


def _box_around(cy, cx, height: int, width: int, lam, exact_cut: bool):
  """The clipped box of side int(side * sqrt(1 - lam)) around (cy, cx)."""
  # 1 - lam can only leave [0, 1] by rounding; the clip keeps the sqrt real.
  ratio = jnp.sqrt(jnp.clip(1.0 - jnp.asarray(lam, jnp.float32), 0.0, 1.0))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  # Older timm floors both halves, so an odd cut loses a pixel; newer timm
  # gives the far side the rounded-up half, so the box side is the cut.
  up = 1 if exact_cut else 0
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + (cut_h + up) // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + (cut_w + up) // 2, 0, width)
  return top, left, bottom, right


def rand_bbox(rng: jax.Array, height: int, width: int, lam: jax.Array, *,
              exact_cut: bool = False):
  """timm's `rand_bbox`: a box covering about 1 - lam of the image.

  The cut sides are int(H * sqrt(1 - lam)) and int(W * sqrt(1 - lam)); the
  centre is uniform over the pixels and the box around it is clipped at the
  borders. Use `bbox_lam` for the lam the clipped box really gives
  (`correct_lam`).

  Args:
    rng: a PRNG key.
    height: H, static.
    width: W, static.
    lam: scalar in [0, 1], the Beta draw.
    exact_cut: False (default) spans centre - cut // 2 to centre + cut // 2,
      as timm 0.3.2 does, which the MAE and BEiT fine-tuning recipes pin:
      an odd cut comes out one pixel short. True spans centre - cut // 2 to
      centre + (cut + 1) // 2, as recent timm (1.0.31 here) does.

  Returns:
    (top, left, bottom, right) int32 scalars; rows top..bottom-1 and columns
    left..right-1 are in the box (empty when lam is 1).
  """
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height, dtype=jnp.int32)
  cx = jax.random.randint(rng_x, (), 0, width, dtype=jnp.int32)
  return _box_around(cy, cx, height, width, lam, exact_cut)


def bbox_lam(box, height: int, width: int) -> jax.Array:
  """timm's `correct_lam`: 1 - box area / (H * W), as float32."""
  top, left, bottom, right = box
  area = jnp.asarray((bottom - top) * (right - left), jnp.float32)
  return 1.0 - area / float(height * width)


def _check_args(mixup_alpha, cutmix_alpha, switch_prob, prob, smoothing):
  """Raises errors.ConfigError naming the first argument out of range (as
  the config field that sets it: config.mixup.<name>,
  config.loss.label_smoothing)."""
  for name, value in (('mixup_alpha', mixup_alpha),
                      ('cutmix_alpha', cutmix_alpha)):
    if not value >= 0.0:  # Also rejects NaN.
      raise errors.ConfigError(f'mixup.{name}={value} must be >= 0 (0 turns '
                               'it off).')
  if mixup_alpha == 0.0 and cutmix_alpha == 0.0:
    raise errors.ConfigError('mixup.mixup_alpha and mixup.cutmix_alpha are '
                             'both 0: nothing to mix; pass no mixup config '
                             'instead.')
  for name, value in (('switch_prob', switch_prob), ('prob', prob)):
    if not 0.0 <= value <= 1.0:
      raise errors.ConfigError(f'mixup.{name}={value} must be a probability '
                               'in [0, 1].')
  if not 0.0 <= smoothing < 1.0:
    raise errors.ConfigError(f'loss.label_smoothing={smoothing} must be in '
                             '[0, 1).')


def sample_params(rng: jax.Array, height: int, width: int, *,
                  mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                  switch_prob: float = 0.5, prob: float = 1.0,
                  exact_cut: bool = False) -> MixParams:
  """Draws the batch's mode, lam and CutMix box (timm `_params_per_batch`).

  Args:
    rng: a PRNG key.
    height: image height H, static.
    width: image width W, static.
    mixup_alpha: Beta parameter of Mixup; 0 disables Mixup.
    cutmix_alpha: Beta parameter of CutMix; 0 disables CutMix.
    switch_prob: probability of CutMix when both are enabled.
    prob: probability of mixing the batch at all.
    exact_cut: the CutMix box rule of recent timm; see `rand_bbox`.

  Returns:
    A `MixParams`, lam already corrected to the box area for CutMix.

  Raises:
    errors.ConfigError: a negative alpha, both alphas 0, or a probability
      outside [0, 1].
  """
  _check_args(mixup_alpha, cutmix_alpha, switch_prob, prob, 0.0)
  rng_apply, rng_switch, rng_mix, rng_cut, rng_box = jax.random.split(rng, 5)
  # uniform is in [0, 1): prob 0 never mixes and prob 1 always does, as
  # timm's `np.random.rand() < prob`.
  apply = jax.random.uniform(rng_apply) < prob
  if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
  # Both lams are cheap scalars: draw each enabled one and select, rather
  # than branch. A disabled alpha is 0, where Beta is undefined, so its lam
  # is a constant that the select never picks.
  one = jnp.ones((), jnp.float32)
  lam_mix = (jax.random.beta(rng_mix, mixup_alpha, mixup_alpha)
             if mixup_alpha > 0.0 else one)
  lam_cut = (jax.random.beta(rng_cut, cutmix_alpha, cutmix_alpha)
             if cutmix_alpha > 0.0 else one)
  box = rand_bbox(rng_box, height, width, lam_cut, exact_cut=exact_cut)
  lam_cut = bbox_lam(box, height, width)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix.astype(jnp.float32))
  lam = jnp.where(apply, lam, one)
  mode = jnp.where(apply, jnp.where(use_cutmix, CUTMIX, MIXUP), NO_MIX)
  return MixParams(lam=lam, mode=mode.astype(jnp.int32), box=box)


def apply_params(images: jax.Array, params: MixParams) -> jax.Array:
  """Mixes `images` (B, H, W, C) with their reversed batch as drawn.

  Only the drawn branch runs (lax.switch), so an unmixed step costs no
  blend. The result has the dtype of `images`; the Mixup blend is computed
  in float32.
  """
  _, height, width, _ = images.shape
  flipped = jnp.flip(images, 0)

  def no_mix(x, y):
    del y
    return x

  def mixup(x, y):
    lam = params.lam
    out = lam * x.astype(jnp.float32) + (1.0 - lam) * y.astype(jnp.float32)
    return out.astype(x.dtype)

  def cutmix(x, y):
    top, left, bottom, right = params.box
    # A box mask from iota comparisons keeps the shapes static.
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    inside = ((rows >= top) & (rows < bottom) &
              (cols >= left) & (cols < right))
    return jnp.where(inside[None, :, :, None], y, x)

  return jax.lax.switch(params.mode, (no_mix, mixup, cutmix), images, flipped)


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
        num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5, prob: float = 1.0, smoothing: float = 0.1,
        exact_cut: bool = False):
  """timm `Mixup(mode='batch', correct_lam=True)` on a batch, jittable.

  Each example i is mixed with example B - 1 - i of the same (global)
  batch; see the module docstring for how this compares with timm's
  per-GPU flip under DDP. An odd batch's middle example is unchanged.

  Args:
    rng: a PRNG key; the same key gives the same draw.
    images: (B, H, W, C) floating images (any normalisation).
    labels: (B,) int class ids.
    num_classes: K, the width of the targets.
    mixup_alpha: Beta parameter of Mixup; 0 disables Mixup.
    cutmix_alpha: Beta parameter of CutMix; 0 disables CutMix.
    switch_prob: probability of CutMix when both are enabled.
    prob: probability of mixing the batch at all.
    smoothing: label smoothing of both targets.
    exact_cut: the CutMix box rule of recent timm; see `rand_bbox`.

  Returns:
    (images, targets, lam): the mixed images (dtype of `images`), float32
    soft targets (B, K) summing to 1, and the float32 scalar lam (1 when
    the batch was not mixed).

  Raises:
    errors.ConfigError: a negative alpha, both alphas 0 (pass no mixup
      config instead), a probability outside [0, 1], smoothing outside
      [0, 1).
    ValueError: images/labels of the wrong rank or batch size.
  """
  _check_args(mixup_alpha, cutmix_alpha, switch_prob, prob, smoothing)
  if images.ndim != 4:
    raise ValueError(f'images have shape {images.shape}; mix wants '
                     '(B, H, W, C).')
  if labels.shape != images.shape[:1]:
    raise ValueError(f'labels have shape {labels.shape}; mix wants '
                     f'({images.shape[0]},), one id per image.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images are {images.dtype}; Mixup blends pixel values, '
                     'so pass floating images.')
  _, height, width, _ = images.shape
  params = sample_params(rng, height, width, mixup_alpha=mixup_alpha,
                         cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                         prob=prob, exact_cut=exact_cut)
  mixed = apply_params(images, params)
  target = smooth_one_hot(labels, num_classes, smoothing)
  # lam = 1 gives target + 0 * partner, i.e. exactly the smoothed labels.
  targets = params.lam * target + (1.0 - params.lam) * jnp.flip(target, 0)
  return mixed, targets, params.lam


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm `SoftTargetCrossEntropy` per example: sum(-t * log_softmax(z)).

  Args:
    logits: (..., K) in any float dtype; computed in float32 so that a
      bfloat16 head does not lose the loss's precision.
    targets: (..., K) soft targets, e.g. from `mix`.

  Returns:
    float32 loss of shape (...,); take its mean for timm's reduction.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)
