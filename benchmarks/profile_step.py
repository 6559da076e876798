r"""Where the train step's time goes, by XLA op, printed as JSON.

  python benchmarks/profile_step.py --config=configs/mae_vitb.py \
      --config.input.batch_size=16 --config.mesh="(('data', 1),)" \
      [--config.model.scan=False] [--steps=2] [--top=15]

Compiles the config's train step on a synthetic batch (as
benchmarks/train_step_bench.py), runs `--steps` steps under
`jax.profiler.trace` and reads the trace's per-thunk events. Each executed
HLO instruction is put in a category from the optimised HLO (what its
fusion contains): matmul/conv (with their fused epilogues), copy/transpose,
concat/pad/slice (dynamic slices of scan included), elementwise
transcendental (exp, erf), other elementwise, reduce, gather, scatter, sort.

Reports per step: wall time, the summed op time (more than the wall time
when ops run concurrently on several cores), each category's op time and
share, and the top instructions with their category, shape and the jax
ops they came from (HLO metadata). `--smoke`: the tiny config, one step.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import app
from absl import flags
from ml_collections import config_flags

import train_step_bench
# pylint: enable=g-import-not-at-top,g-bad-import-order

_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')
_INSTR = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def parse_hlo(text: str):
  """{computation: [lines]} and {instruction: (opcode, shape, line)}."""
  comps, instrs, cur = {}, {}, None
  for line in text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{') and (
        '(' in line):
      cur = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      comps[cur] = []
      continue
    if cur is not None:
      comps[cur].append(line)
    m = _INSTR.match(line)
    if m:
      instrs[m.group(1)] = (m.group(3), m.group(2), line)
  return comps, instrs


def _opcodes(comps: dict, comp: str, depth: int = 0) -> set[str]:
  out = set()
  for line in comps.get(comp, ()):
    m = _INSTR.match(line)
    if m:
      out.add(m.group(3))
    if depth < 4:
      for sub in _CALLS.findall(line):
        out |= _opcodes(comps, sub, depth + 1)
  return out


def category(name: str, comps: dict, instrs: dict) -> str:
  """The category of an executed HLO instruction (see module docstring)."""
  opcode, _, line = instrs[name]
  ops = {opcode}
  if opcode == 'fusion':
    ops = set()
    for sub in _CALLS.findall(line):
      ops |= _opcodes(comps, sub)
  if name.startswith('ynn_fusion') or ops & {'dot', 'convolution'}:
    return 'matmul/conv'
  for key in ('scatter', 'gather', 'sort'):
    if key in ops:
      return key
  if ops & {'dynamic-slice', 'dynamic-update-slice', 'concatenate', 'pad',
            'slice'}:
    return 'concat/pad/slice'
  if ops & {'reduce', 'reduce-window'}:
    return 'reduce'
  if ops & {'exponential', 'erf', 'tanh', 'log'}:
    return 'elementwise transcendental'
  if ops and ops <= {'copy', 'transpose', 'bitcast', 'parameter'}:
    return 'copy/transpose'
  if opcode in ('while', 'call', 'conditional'):
    return 'control flow'
  return 'elementwise other'


def profile(config, num_steps: int = 2, top: int = 15) -> dict:
  """Profiles `num_steps` train steps; the dict the script prints."""
  import jax  # pylint: disable=g-import-not-at-top
  compiled, state, batch, frozen, compile_s = train_step_bench.compile_step(
      config)
  comps, instrs = parse_hlo(compiled.as_text())
  state, step_s = train_step_bench.run_steps(compiled, state, batch, frozen,
                                             num_steps)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(num_steps):
        state, m = compiled(state, batch, frozen)
      jax.block_until_ready(m)
    path = glob.glob(os.path.join(d, '**', 'perfetto_trace.json.gz'),
                     recursive=True)[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  op_us = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in instrs:
      op_us[e['name']] += e.get('dur', 0)
  per_step = {k: v / 1e3 / num_steps for k, v in op_us.items()}  # ms
  total = sum(per_step.values())
  cats = collections.Counter()
  for name, ms in per_step.items():
    cats[category(name, comps, instrs)] += ms
  tops = []
  for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]:
    opcode, shape, line = instrs[name]
    tops.append(dict(name=name, ms=round(ms, 2),
                     share=round(ms / total, 4),
                     category=category(name, comps, instrs), shape=shape,
                     jax_op=(_OP_NAME.findall(line) or [''])[0][-120:]))
  return dict(
      benchmark='profile_step',
      model=config.model.get('variant') or dict(config.model.encoder),
      batch=int(config.input.batch_size),
      image_size=int(config.input.image_size),
      scan=config.model.get('scan'), platform=jax.devices()[0].platform,
      devices=jax.device_count(), compile_sec=round(compile_s, 2),
      step_sec=round(step_s, 4), op_ms_per_step=round(total, 1),
      categories={k: {'ms': round(v, 1), 'share': round(v / total, 4)}
                  for k, v in cats.most_common()},
      top_ops=tops)


def main(_):
  f = flags.FLAGS
  config = f.config
  if f.smoke:
    config.input.batch_size = 8
  out = profile(config, 1 if f.smoke else f.steps, f.top)
  for k, v in out['categories'].items():
    print(f'{k:28s} {v["ms"]:10.1f} ms  {100 * v["share"]:5.1f}%')
  print(json.dumps(out))


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'mae_tiny.py'), 'Config.')
  flags.DEFINE_integer('steps', 2, 'Profiled steps (after one warm step).')
  flags.DEFINE_integer('top', 15, 'Instructions listed.')
  flags.DEFINE_bool('smoke', False, 'Tiny config, one step (tests).')
  app.run(main)
