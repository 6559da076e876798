"""The architecture contracts of pyproject.toml ([tool.importlinter]): the
tree keeps them, and each one fails on a deliberate violation (a copy of the
package with one forbidden import added)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')

# contract name (start) -> (module file, forbidden import added to it).
VIOLATIONS = {
    'Models and losses never import': (
        'mim_jax/methods/mae/loss.py', 'from mim_jax import input_pipeline'),
    'The input pipeline never imports models': (
        'mim_jax/data/augment.py', 'from mim_jax.models import vit'),
    'Generic modules never import a method': (
        'mim_jax/visualize.py', 'from mim_jax.methods.bootmae import loss'),
    'Concern modules never import': (
        'mim_jax/nonfinite.py', 'from mim_jax import hooks'),
    'Method packages never import each other': (
        'mim_jax/methods/classifier/config.py',
        'from mim_jax.methods.cae import finetune'),
    'Layers: tools on top': (
        'mim_jax/checkpoint.py', 'from mim_jax.tools import plan'),
}


def _lint(root: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [LINT, '--no-cache', '--config', os.path.join(root, 'pyproject.toml')],
      cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
      text=True, timeout=120, check=False)


def _verdicts(output: str) -> dict:
  """contract name start -> 'KEPT' / 'BROKEN' from lint-imports' summary."""
  text = ' '.join(output.split())
  out = {}
  for name in VIOLATIONS:
    i = text.find(name)
    assert i >= 0, f'contract {name!r} not reported:\n{output}'
    kept, broken = (text.find(w, i) for w in ('KEPT', 'BROKEN'))
    kept, broken = (x if x >= 0 else len(text) for x in (kept, broken))
    out[name] = 'KEPT' if kept < broken else 'BROKEN'
  return out


def test_tree_keeps_every_contract():
  result = _lint(ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert set(_verdicts(result.stdout).values()) == {'KEPT'}


@pytest.mark.parametrize('contract', sorted(VIOLATIONS))
def test_contract_fails_on_a_violation(contract, tmp_path):
  root = str(tmp_path)
  shutil.copytree(os.path.join(ROOT, 'mim_jax'),
                  os.path.join(root, 'mim_jax'),
                  ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(ROOT, 'pyproject.toml'), root)
  path, line = VIOLATIONS[contract]
  with open(os.path.join(root, path), 'a') as f:
    f.write(f'\n{line}  # deliberate violation\n')
  result = _lint(root)
  assert result.returncode != 0, result.stdout
  assert _verdicts(result.stdout)[contract] == 'BROKEN', result.stdout
