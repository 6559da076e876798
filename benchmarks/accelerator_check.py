r"""The Python half of benchmarks/accelerator_check.sh (which runs it; not a
benchmark on its own).

  python benchmarks/accelerator_check.py probe [--smoke] --env=FILE
  python benchmarks/accelerator_check.py mfu WORKDIR
  python benchmarks/accelerator_check.py curves WORKDIR [--figure=PNG]
  python benchmarks/accelerator_check.py assemble PARTS_DIR OUT

- `probe`: the machine (JAX's first device, versions, the GPU's peak bf16
  TFLOP/s) as JSON, and shell variables for the script in `--env`. Exit 3
  with a message when JAX runs on the CPU and this is not `--smoke`.
- `mfu`: train/mfu, images/s and TFLOP/s per device from a training
  workdir's metrics.jsonl (the first logged row, which holds the compile,
  left out).
- `curves`: `mim_jax.tools.compare_curves` of a workdir against the
  official MAE curves (tests/fixtures/curves_mae_tiny/curves.json), judged
  by the goals of benchmarks/curves_vs_pytorch.py.
- `assemble`: the one JSON of the check from every part's log and status.

Each command prints one JSON object as its last line.
"""

import json
import os
from importlib import metadata
import platform
import re
import socket
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, 'benchmarks')):
  if _p not in sys.path:
    sys.path.insert(0, _p)

REFERENCE = os.path.join(ROOT, 'tests', 'fixtures', 'curves_mae_tiny',
                         'curves.json')
# Dense bf16 TFLOP/s per GPU (NVIDIA's datasheets give them with 2:4
# sparsity, twice these), matched in order against jax's device_kind.
GPU_PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100 NVL', 835.0),
                   ('GH200', 989.0), ('H200', 989.0), ('H100', 989.0),
                   ('H800', 989.0), ('B200', 2250.0), ('A100', 312.0),
                   ('L40S', 362.0), ('A10G', 70.0))
NO_GPU = ('JAX runs on the CPU ({detail}): this check needs a CUDA build of '
          'JAX. Install it with  pip install -U "jax[cuda12]"  (and leave '
          'JAX_PLATFORMS unset), or run  benchmarks/accelerator_check.sh '
          '--smoke  for the CPU dry run.')
TAIL_CHARS = 3000


def peak_tflops(device_kind: str) -> tuple[float | None, str]:
  """(peak, where it came from): $PEAK_TFLOPS, else GPU_PEAK_TFLOPS."""
  if os.environ.get('PEAK_TFLOPS'):
    return float(os.environ['PEAK_TFLOPS']), 'PEAK_TFLOPS'
  for name, peak in GPU_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak, f'GPU_PEAK_TFLOPS[{name!r}]'
  return None, 'unknown (set PEAK_TFLOPS)'


def slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_') or 'device'


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def nvidia_smi() -> str | None:
  """nvidia-smi's name, driver and memory of each GPU (None without it)."""
  try:
    res = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
         '--format=csv,noheader'], capture_output=True, text=True,
        timeout=20, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return res.stdout.strip() or None


def probe(smoke: bool) -> dict:
  """The machine, as the JSON's `device`."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  out = dict(platform=d.platform, device_kind=d.device_kind,
             device_count=jax.device_count(), jax=jax.__version__,
             jaxlib=_version('jaxlib'),
             jax_cuda12_plugin=_version('jax-cuda12-plugin'),
             host=socket.gethostname(),
             python=platform.python_version(), cpus=os.cpu_count(),
             nvidia_smi=nvidia_smi())
  if smoke:  # (importing torch costs seconds; its version is enough)
    out['torch'] = _version('torch')
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                 torch_gpu=(torch.cuda.get_device_name(0)
                            if torch.cuda.is_available() else None))
    except ImportError as e:
      out.update(torch=None, torch_error=str(e))
  if smoke:  # no peak on a CPU: a placeholder, so the MFU path runs
    out.update(peak_tflops=1.0, peak_source='smoke placeholder')
  else:
    out['peak_tflops'], out['peak_source'] = peak_tflops(d.device_kind)
  out['slug'] = ('smoke_' if smoke else '') + slug(
      d.device_kind if d.platform == 'gpu' else d.platform)
  return out


def write_env(info: dict, path: str):
  """Shell variables for the script (peak, file name, platform)."""
  with open(path, 'w') as f:
    f.write(f"PLATFORM={info['platform']}\n"
            f"DEVICE_SLUG={info['slug']}\n"
            f"PEAK={info['peak_tflops'] or ''}\n")


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(x) for x in f if x.strip()]


def mfu(workdir: str) -> dict:
  """The speed rows of a training run: medians over the logged rows but
  the first (it holds the compile)."""
  rows = [r for r in _rows(workdir) if 'train/images_per_sec' in r]
  if len(rows) < 2:
    raise ValueError(f'{workdir}/metrics.jsonl has {len(rows)} speed rows; '
                     'need 2 or more (the first holds the compile).')
  kept = rows[1:]
  out = dict(steps=[int(r['step']) for r in kept],
             rows_left_out=[int(rows[0]['step'])])
  for key in ('train/mfu', 'train/images_per_sec', 'train/steps_per_sec',
              'train/tflops_per_device', 'train/loss'):
    if key in kept[0]:
      short = key.split('/', 1)[1]
      out[short] = statistics.median(r[key] for r in kept)
      out[short + '_rows'] = [r[key] for r in kept]
  with open(os.path.join(workdir, 'config.json')) as f:
    cfg = json.load(f)
  out.update(batch_size=cfg['input']['batch_size'],
             dtype=cfg['model'].get('dtype'),
             peak_tflops=cfg.get('peak_tflops'))
  return out


def curves(workdir: str, figure: str | None) -> dict:
  """compare_curves against the official curves, with the goal checks."""
  import curves_vs_pytorch  # pylint: disable=g-import-not-at-top
  from mim_jax.tools import compare_curves  # pylint: disable=g-import-not-at-top
  report = curves_vs_pytorch.judge(
      compare_curves.run([workdir], [REFERENCE], out=figure))
  with open(os.path.join(workdir, 'config.json')) as f:
    dtype = json.load(f)['model'].get('dtype')
  keep = ('max_abs_z', 'mean_z', 'max_abs_rel', 'final', 'pass',
          'lr_max_abs_rel', 'goals', 'figure')
  return dict({k: report[k] for k in keep if k in report}, dtype=dtype,
              epochs=len(report['points']),
              points=[{k: p[k] for k in ('epoch', 'ours', 'reference', 'z')}
                      for p in report['points']])


def last_json(text: str) -> dict | None:
  """The last line of `text` that parses as a JSON object."""
  for line in reversed(text.strip().splitlines()):
    if line.startswith('{'):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return None


def _read(path: str, default: str = '') -> str:
  if not os.path.exists(path):
    return default
  with open(path, errors='replace') as f:
    return f.read()


def part(parts_dir: str, name: str) -> dict:
  """One part from its files: `<name>.status` ('rc seconds timeout_s', or
  'skipped 0 0'), `<name>.cmd`, `<name>.log` (its output)."""
  rc, seconds, timeout_s = _read(os.path.join(parts_dir, name + '.status'),
                                 'missing 0 0').split()
  out = dict(command=_read(os.path.join(parts_dir, name + '.cmd')).strip(),
             seconds=float(seconds), timeout_s=int(timeout_s), rc=None,
             result=None, error=None)
  if rc in ('skipped', 'missing'):
    out.update(ok=False, error=f'{rc}: no time left in the budget'
               if rc == 'skipped' else 'not run')
    return out
  log = _read(os.path.join(parts_dir, name + '.log'))
  out['rc'], out['result'] = int(rc), last_json(log)
  if out['rc'] in (124, 137):
    out['error'] = f'timed out after {timeout_s} s'
  elif out['rc'] != 0:
    out['error'] = f'exit status {rc}'
  elif out['result'] is None:
    out['error'] = 'no JSON line in its output'
  out['ok'] = out['error'] is None
  if not out['ok']:
    out['log_tail'] = log[-TAIL_CHARS:]
  return out


def summary(parts: dict) -> dict:
  """The headline numbers of the parts that ran."""
  out = {}
  for name, p in parts.items():
    r = p['result'] if p['ok'] else None
    if r is None:
      continue
    if name.startswith('vs_pytorch'):
      for model, m in r.items():
        if isinstance(m, dict) and 'ratio' in m:
          out[f'jax_vs_torch_{r.get("dtype")}_{model}'] = dict(
              ratio=m['ratio'], mim_jax_img_per_s=m['mim_jax']['img_per_s'],
              pytorch_img_per_s=m['pytorch']['img_per_s'],
              mim_jax_matmul_fraction=m['mim_jax']['matmul_fraction'],
              pytorch_matmul_fraction=m['pytorch']['matmul_fraction'],
              mim_jax_compile_s=m['mim_jax']['compile_s'],
              batch_size=r.get('batch_size'))
    elif name == 'mfu':
      out['train_mfu'] = r.get('mfu')
      out['train_images_per_sec'] = r.get('images_per_sec')
    elif name.startswith('curves'):
      out[f'{name}_goals_met'] = r['goals']['met']
    elif name == 'compile':
      out['compile_s'] = {k: v.get('compile_s')
                          for k, v in r.get('results', {}).items()}
  return out


def assemble(parts_dir: str, out_path: str) -> dict:
  """The check's JSON from `parts_dir` (meta.json, probe.log and the
  parts), written to `out_path`."""
  with open(os.path.join(parts_dir, 'meta.json')) as f:
    meta = json.load(f)
  probe_part = part(parts_dir, 'probe')
  parts = {n: part(parts_dir, n) for n in meta.pop('parts')}
  result = dict(benchmark='accelerator_check', **meta,
                device=probe_part['result'] or probe_part, parts=parts,
                ok=all(p['ok'] for p in parts.values()),
                summary=summary(parts))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'w') as f:
    f.write(dumps(result) + '\n')
  return result


def dumps(obj) -> str:
  """Indented JSON with each list of numbers on one line."""
  return re.sub(r'\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]',
                lambda m: '[' + ' '.join(m.group(1).split()) + ']',
                json.dumps(obj, indent=1))


def main(argv: list[str]) -> int:
  cmd, args = argv[1], argv[2:]
  opts = dict(a[2:].split('=', 1) for a in args if a.startswith('--')
              and '=' in a)
  pos = [a for a in args if not a.startswith('--')]
  if cmd == 'probe':
    info = probe('--smoke' in args)
    print(json.dumps(info))
    write_env(info, opts['env'])
    if info['platform'] == 'cpu' and '--smoke' not in args:
      print(NO_GPU.format(detail=f'jax.devices()[0].platform is '
                          f"'cpu', JAX {info['jax']}"), file=sys.stderr)
      return 3
  elif cmd == 'mfu':
    print(json.dumps(mfu(pos[0])))
  elif cmd == 'curves':
    print(json.dumps(curves(pos[0], opts.get('figure'))))
  elif cmd == 'assemble':
    r = assemble(pos[0], pos[1])
    print(json.dumps(dict(ok=r['ok'], summary=r['summary'])))
  else:
    print(__doc__, file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
