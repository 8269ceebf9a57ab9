"""Security basics: no pickle on any load path, names cannot escape the run directory, and the
docs say plainly that a config file is a program."""

import os
import re

import pytest
from conftest import ROOT

from lm.train import rundir
from lm.errors import UserError


@pytest.mark.parametrize('name', ['../escape', '/etc/passwd', 'checkpoints/../../escape', '', 'a\x00b',
                                  'link/inside-the-link'])
def test_crafted_names_cannot_leave_the_run_directory(tmp_path, name):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'link').symlink_to(tmp_path)  # a symbolic link pointing out of the run directory
  with pytest.raises(UserError):
    rundir.inside(str(run), *name.split('/') if name.startswith('link') else [name])


def test_plain_names_stay_inside(tmp_path):
  assert rundir.inside(str(tmp_path), 'checkpoints', '12') == os.path.join(
      os.path.realpath(tmp_path), 'checkpoints', '12')
  assert rundir.inside(str(tmp_path), 'exports/model.safetensors').startswith(
      os.path.realpath(tmp_path))


def test_records_are_written_atomically(tmp_path):
  path = str(tmp_path / 'summary.json')
  rundir.write_text(path, '{"step": 1}')
  rundir.write_text(path, '{"step": 2}')
  assert open(path, encoding='utf-8').read() == '{"step": 2}'
  assert os.listdir(tmp_path) == ['summary.json']  # no temporary file left behind


UNSAFE = re.compile(r'\bimport pickle\b|\bfrom pickle\b|cPickle|\bdill\b|\bjoblib\b|allow_pickle\s*=\s*True'
                    r'|torch\.load\(|read_pickle|\bshelve\b|\bmarshal\.load')


def test_no_pickle_on_any_load_path():
  """Checkpoints are Orbax (tensorstore + JSON), tokenizers SentencePiece protos, weights
  safetensors, records JSON: nothing that can run code when read."""
  offenders = []
  for folder in ('lm', 'launch', 'configs'):
    for root, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if name.endswith('.py'):
          with open(os.path.join(root, name), encoding='utf-8') as f:
            for lineno, line in enumerate(f, 1):
              if UNSAFE.search(line) and not line.lstrip().startswith('#'):
                offenders.append(f'{os.path.relpath(os.path.join(root, name), ROOT)}:{lineno}')
  assert not offenders, offenders


def test_docs_say_configs_are_programs():
  with open(os.path.join(ROOT, 'docs', 'reliability.md'), encoding='utf-8') as f:
    text = f.read()
  assert 'A config file is a Python program' in text
