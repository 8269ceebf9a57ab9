"""The one Jinja environment lm renders templates in: chat templates (a tokenizer's, a GGUF file's,
a .jinja file) and task files' prompt/target/choices templates.

Templates arrive inside data that people share (tokenizer_config.json, GGUF metadata, task YAML),
so they are rendered as data, never as code: jinja2's ImmutableSandboxedEnvironment refuses
attribute paths such as `cycler.__init__.__globals__` (the way out of a plain Environment) and
in-place changes to the values passed in, and the operators that can build a huge value from a
short template (`'a' * 10**10`, `9**9**9`) are capped, so a template cannot exhaust memory either.
"""

from __future__ import annotations

import operator

MAX_SIZE = 10_000_000  # characters or items a template's `*` may build; exponents above 256 bits


def environment(**options):
  """A sandboxed jinja2 Environment with `options` (undefined=, trim_blocks=, ...)."""
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

  class Environment(sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({'*', '**'})

    def call_binop(self, context, operator_name, left, right):
      if operator_name == '**':
        if isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and (
            right > 256 or right * max(abs(left), 2).bit_length() > 4096):
          raise sandbox.SecurityError(f'{left} ** {right} is too large for a template')
        return operator.pow(left, right)
      if isinstance(left, (str, list, tuple)) and isinstance(right, int) or (
          isinstance(right, (str, list, tuple)) and isinstance(left, int)):
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if len(seq) * n > MAX_SIZE:
          raise sandbox.SecurityError(f'a template may build at most {MAX_SIZE} items with *')
      return operator.mul(left, right)

  return Environment(**options)


def security_error():
  """jinja2's SecurityError class: what a template that reaches outside its data raises."""
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel
  return sandbox.SecurityError
