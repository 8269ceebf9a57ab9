"""The Python API example in docs/api.md runs as written."""

import os
import re

import pytest
from conftest import ROOT, SHARED_DATA


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason='needs ../shared/data (CI has it)')
def test_docs_api_example_runs(tmp_path, monkeypatch):
  with open(os.path.join(ROOT, 'docs', 'api.md'), encoding='utf-8') as f:
    code = re.search(r'```python\n(.*?)```', f.read(), re.S).group(1)
  monkeypatch.chdir(ROOT)
  code = code.replace("'runs/api-demo'", repr(str(tmp_path / 'api-demo')))
  namespace = {}
  exec(compile(code, 'docs/api.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['summary']['step'] == 6
  assert os.path.isdir(tmp_path / 'api-demo' / 'checkpoints')
  assert all(isinstance(c, str) for c in namespace['completions'])
