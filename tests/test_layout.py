"""The package's shape: no import cycles between lm's modules, no import that reaches up a layer,
and a README layout tree that matches the folder listing.

Every `import` counts, including ones inside functions: a deferred import hides a cycle from
Python but not from a reader.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lower layers never import higher ones. A module's layer is its longest matching prefix.
LAYERS = [
    ('lm.errors', 'lm.config', 'lm.sharding', 'lm.distributed', 'lm.host_memory', 'lm.platforms'),
    ('lm.data', 'lm.model'),
    ('lm.train',),            # state, partition, optim, objectives, step, guard, checkpoint, ...
    ('lm.io',),               # run directories, Hugging Face, PEFT, export
    ('lm.eval',),             # generation, scoring, tasks, evaluate, compare
    ('lm.train.loop', 'lm.train.grpo_loop', 'lm.train.runner', 'lm.data.show', 'lm.plan'),  # the loop and commands that compose the above
    ('lm.bench', 'lm.cli', 'lm.__main__', 'lm'),
]


def layer(module: str) -> int:
  best, level = '', None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + '.')) and len(p) > len(best):
        best, level = p, i
  assert level is not None, f'{module} is in no layer of tests/test_layout.py'
  return level


def modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, 'lm')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return out


def import_graph() -> dict[str, set[str]]:
  mods = modules()
  graph = {m: set() for m in mods}
  for mod, path in mods.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from lm.x import y`: y is a module when lm/x/y.py exists, else a name in lm.x.
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods else node.module
                   for a in node.names]
      for t in targets:
        if t in mods and t != mod:
          graph[mod].add(t)
  return graph


def find_cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 40 and 'lm.train.step' in graph['lm.train.loop']
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_module_imports_from_a_higher_layer():
  upward = sorted(f'{m} -> {t}' for m, targets in import_graph().items() for t in targets
                  if layer(t) > layer(m) and not t.startswith(m + '.'))
  assert not upward, 'imports that reach up a layer:\n' + '\n'.join(upward)


def test_readme_layout_tree_matches_the_folders():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  tree = readme.split('## Layout', 1)[1].split('```text', 1)[1].split('```', 1)[0]
  listed = set(re.findall(r'\b([a-z_]+/)', tree))
  on_disk = {d + '/' for d in os.listdir(os.path.join(ROOT, 'lm'))
             if os.path.isdir(os.path.join(ROOT, 'lm', d)) and not d.startswith('__')}
  assert on_disk <= listed, f'README layout misses {sorted(on_disk - listed)}'
  package_part = tree.split('configs/', 1)[0]
  for name in re.findall(r'\b([a-z_]+\.py)\b', package_part):
    assert any(name in files for _, _, files in os.walk(os.path.join(ROOT, 'lm'))), (
        f'README layout names {name}, which is not in lm/')
