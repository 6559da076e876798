r"""Minimal programs of the ops where mim_jax's train step loses time to
PyTorch on XLA:CPU, each timed in jax and in torch (docs/speed.md).

  python benchmarks/xla_cpu_limits.py [--rounds=3] [--repeats=5]
  python benchmarks/xla_cpu_limits.py --smoke     # tests: tiny shapes

Each case runs in alternating child processes (one framework per process,
torch on as many threads as XLA uses cores), best time per side:

- `attention`: forward + backward of one decoder attention (ViT-B MAE
  decoder: batch 16, 197 tokens, 16 heads of 32). jax: `layers.attend`
  (the head-major layout of the train step), the token-major einsums it
  replaced and `jax.nn.dot_product_attention` (XLA:CPU has no fused
  attention kernel, so it lowers to the same dots and softmax); torch:
  `scaled_dot_product_attention` (timm's default, a fused kernel that
  never stores the probabilities) and the explicit matmul-softmax-matmul.
- `scan_stack`: the bookkeeping of a scanned stack. An 8-step `lax.scan`
  whose body is one elementwise op and that stacks an f32[16, 197, 2048]
  output per step, as the backward pass needs the MLP activations: JAX
  creates the stacked output as a zero-filled buffer and updates it slice by
  slice. torch writes into `torch.empty`, which is not filled.
- `weight_grad`: a decoder fc1 weight gradient, x^T @ dy with x f32[3152,
  512] and dy f32[3152, 2048], alone. It shows that XLA's dot itself is
  not slower than torch's; in the step the cost is the transposed copy of
  the operand that XLA:CPU's dot emitter asks for.

The last line is one JSON object: per case, per variant, milliseconds.
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (batch, tokens, heads, head_dim), (layers, batch, tokens, width), (M, K, N)
FULL = dict(attention=(16, 197, 16, 32), scan_stack=(8, 16, 197, 2048),
            weight_grad=(3152, 512, 2048))
SMOKE = dict(attention=(2, 17, 2, 8), scan_stack=(2, 2, 17, 32),
             weight_grad=(64, 16, 32))


def best_ms(fn, repeats: int) -> float:
  """Best wall time of `fn()` over `repeats` calls, after one warm call."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return round(best * 1e3, 3)


def _inputs(shape, count: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def run_jax(sizes: dict, repeats: int) -> dict:
  """The jax side: ms per case and variant."""
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from mim_jax.models import layers
  out = {}

  n, t, h, d = sizes['attention']
  q, k, v, g = map(jnp.asarray, _inputs((n, t, h * d), 4))

  def token_major(q, k, v):  # the formulation before M9
    q = q.reshape(n, t, h, d) * (d ** -0.5)
    k, v = k.reshape(n, t, h, d), v.reshape(n, t, h, d)
    p = jax.nn.softmax(jnp.einsum('nqhd,nkhd->nhqk', q, k), axis=-1)
    return jnp.einsum('nhqk,nkhd->nqhd', p, v).reshape(n, t, h * d)

  def jax_nn(q, k, v):  # jax's own attention (implementation='xla' on CPU)
    return jax.nn.dot_product_attention(
        *(a.reshape(n, t, h, d) for a in (q, k, v))).reshape(n, t, h * d)

  att = {}
  for name, f in (('head_major', lambda q, k, v: layers.attend(
      q, k, v, h, jnp.float32)), ('token_major', token_major),
                  ('jax_nn_dot_product_attention', jax_nn)):
    grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * g),
                            argnums=(0, 1, 2)))
    att[name] = best_ms(
        lambda grad=grad: jax.block_until_ready(grad(q, k, v)), repeats)
  out['attention'] = att

  layers_, b, tok, w = sizes['scan_stack']
  x0 = jnp.asarray(_inputs((b, tok, w), 1)[0])

  def body(x, _):
    return x * 1.0001, x * 2.0

  scanned = jax.jit(lambda x: jax.lax.scan(body, x, None, length=layers_))

  @jax.jit
  def unrolled(x):
    ys = []
    for _ in range(layers_):
      x, y = body(x, None)
      ys.append(y)
    return x, jnp.stack(ys)

  no_stack = jax.jit(lambda x: jax.lax.scan(
      lambda c, _: (c * 1.0001, None), x, None, length=layers_))
  out['scan_stack'] = dict(
      scan=best_ms(lambda: jax.block_until_ready(scanned(x0)), repeats),
      unrolled_stack=best_ms(
          lambda: jax.block_until_ready(unrolled(x0)), repeats),
      scan_without_stack=best_ms(
          lambda: jax.block_until_ready(no_stack(x0)), repeats),
      stack_mib=round(layers_ * b * tok * w * 4 / 2 ** 20, 3))

  m, kk, nn_ = sizes['weight_grad']
  x = jnp.asarray(_inputs((m, kk), 1)[0])
  dy = jnp.asarray(_inputs((m, nn_), 1, seed=1)[0])
  wgrad = jax.jit(lambda x, dy: x.T @ dy)
  out['weight_grad'] = dict(
      x_t_dy=best_ms(lambda: jax.block_until_ready(wgrad(x, dy)), repeats))
  out['version'] = jax.__version__
  out['torch_imported'] = 'torch' in sys.modules
  return out


def run_torch(sizes: dict, repeats: int) -> dict:
  """The torch side: ms per case and variant."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(os.cpu_count() or 1)
  out = {}
  n, t, h, d = sizes['attention']
  q, k, v, g = (torch.from_numpy(a).reshape(n, t, h, d).transpose(1, 2)
                for a in _inputs((n, t, h * d), 4))

  def explicit(q, k, v):
    return ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

  att = {}
  for name, f in (('sdpa', F.scaled_dot_product_attention),
                  ('explicit', explicit)):
    def fwd_bwd(f=f):
      qq, kk, vv = (a.detach().requires_grad_() for a in (q, k, v))
      (f(qq, kk, vv) * g).sum().backward()
    att[name] = best_ms(fwd_bwd, repeats)
  out['attention'] = att

  layers_, b, tok, w = sizes['scan_stack']
  x0 = torch.from_numpy(_inputs((b, tok, w), 1)[0])

  def stacked():
    ys = torch.empty((layers_, b, tok, w))
    x = x0
    for i in range(layers_):
      torch.mul(x, 2.0, out=ys[i])
      x = x * 1.0001
    return x, ys

  out['scan_stack'] = dict(loop_into_empty=best_ms(stacked, repeats))
  m, kk, nn_ = sizes['weight_grad']
  x = torch.from_numpy(_inputs((m, kk), 1)[0])
  dy = torch.from_numpy(_inputs((m, nn_), 1, seed=1)[0])
  out['weight_grad'] = dict(x_t_dy=best_ms(lambda: x.t() @ dy, repeats))
  out['version'] = torch.__version__
  out['threads'] = torch.get_num_threads()
  out['jax_imported'] = 'jax' in sys.modules
  return out


FLAGS = flags.FLAGS


def _child(side: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}',
         f'--repeats={FLAGS.repeats}'] + (['--smoke'] if FLAGS.smoke else [])
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       check=False)
  lines = [x for x in res.stdout.splitlines() if x.startswith('{')]
  if res.returncode or not lines:
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {res.returncode}):\n'
                       f'{res.stdout[-2000:]}\n{res.stderr[-4000:]}')
  return json.loads(lines[-1])


def _best(runs: list[dict]) -> dict:
  """Per case and variant, the best time over rounds."""
  out = {}
  for case in FULL:
    out[case] = {var: min(r[case][var] for r in runs)
                 for var in runs[0][case]}
  return out


def main(_):
  sizes = SMOKE if FLAGS.smoke else FULL
  if FLAGS.side == 'jax':
    print(json.dumps(run_jax(sizes, FLAGS.repeats)))
    return
  if FLAGS.side == 'torch':
    print(json.dumps(run_torch(sizes, FLAGS.repeats)))
    return
  runs = {'jax': [], 'torch': []}
  for _ in range(1 if FLAGS.smoke else FLAGS.rounds):
    for side in ('torch', 'jax'):
      runs[side].append(_child(side))
  if any(r['torch_imported'] for r in runs['jax']) or any(
      r['jax_imported'] for r in runs['torch']):
    raise RuntimeError('a child imported the other framework')
  jx, tc = _best(runs['jax']), _best(runs['torch'])
  result = dict(
      benchmark='xla_cpu_limits', sizes=sizes, cores=os.cpu_count(),
      jax=jx, torch=tc,
      versions=dict(jax=runs['jax'][0]['version'],
                    torch=runs['torch'][0]['version']),
      ratios=dict(  # > 1: jax is slower
          attention_vs_sdpa=round(jx['attention']['head_major'] /
                                  tc['attention']['sdpa'], 3),
          attention_vs_explicit=round(jx['attention']['head_major'] /
                                      tc['attention']['explicit'], 3),
          scan_stack=round(jx['scan_stack']['scan'] /
                           tc['scan_stack']['loop_into_empty'], 3),
          weight_grad=round(jx['weight_grad']['x_t_dy'] /
                            tc['weight_grad']['x_t_dy'], 3)))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.DEFINE_enum('side', 'both', ['both', 'jax', 'torch'],
                    'Parent (both) or one child.')
  flags.DEFINE_integer('rounds', 3, 'Alternating rounds per side.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per case, best kept.')
  flags.DEFINE_bool('smoke', False, 'Tiny shapes, one round (tests).')
  app.run(main)
