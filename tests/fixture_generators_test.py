"""The reference-curve generators beside their fixtures
(tests/fixtures/curves_{cae,bootmae}_tiny/make.py) refuse bad input with one
clear line and exit status 2, before any upstream code runs (CI has no
upstream checkout)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES

PHOTOS = os.path.join(FIXTURES, 'curves_mae_tiny', 'photos', 'train',
                      'photos')


def _make(method: str, *args) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable,
       os.path.join(FIXTURES, f'curves_{method}_tiny', 'make.py'), 'all',
       *args], capture_output=True, text=True, timeout=120)


def _one_line_error(res, *words):
  assert res.returncode == 2, (res.stdout, res.stderr)
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, res.stderr
  for w in words:
    assert w in lines[0], lines[0]


@pytest.fixture(scope='module')
def few_photos(tmp_path_factory):
  """An ImageFolder root with 15 photos: fewer than one batch of 32."""
  root = tmp_path_factory.mktemp('few')
  os.makedirs(root / 'train' / 'photos')
  for name in sorted(os.listdir(PHOTOS))[:15]:
    shutil.copy(os.path.join(PHOTOS, name), root / 'train' / 'photos')
  return str(root)


@pytest.mark.parametrize('method', ['cae', 'bootmae'])
def test_too_few_photos(method, few_photos):
  _one_line_error(_make(method, f'--photos={few_photos}'), '15 images',
                  'one batch needs 32')


@pytest.mark.parametrize('method', ['cae', 'bootmae'])
def test_unknown_recipe_key(method):
  _one_line_error(_make(method, '--set', 'no_such_key=1'), 'no_such_key')


def test_tokenizer_that_is_not_a_dalle_encoder(tmp_path):
  path = str(tmp_path / 'encoder.pkl')
  torch.save(torch.nn.Linear(2, 3), path)
  _one_line_error(_make('cae', f'--tokenizer={path}'), path, 'DALL-E')
  (tmp_path / 'text.pkl').write_text('not a pickle')
  _one_line_error(_make('cae', f'--tokenizer={tmp_path / "text.pkl"}'),
                  'DALL-E')
