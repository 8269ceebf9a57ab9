"""Preference data: pairs for DPO and its family (a prompt with a chosen and a rejected reply),
and unpaired labelled examples for KTO (format `kto`, at the end of this file).

Records come in two shapes:
  sharegpt (LLaMA-Factory's dpo_en_demo): {conversations: [{from, value}...], chosen: {from, value},
      rejected: {from, value}}
  flat: {prompt, chosen, rejected}; prompt a string (one user turn) or a list of messages; chosen
      and rejected strings, one message, or whole conversations whose shared start is the prompt.
  HH-RLHF (Anthropic/hh-rlhf): {chosen, rejected}, each a whole dialogue as one string,
      "\n\nHuman: ...\n\nAssistant: ...", the two sharing every turn but the last.

A batch of pairs holds `chosen_<key>` and `rejected_<key>` for every key of the base format
(tokens, targets, weights, segment_ids, positions). Row i of the chosen and rejected arrays
come from the same pairs, laid out identically: pair j of a row is segment j in both rows, and both
sequences start with the same prompt ids. Weights are 1 on the reply (and its end-of-turn token)
only, so a DPO objective sums log-probabilities per segment over `weights`.
"""

from __future__ import annotations

import re

from lm.data import chat
from lm.errors import DataError


def pair_keys(keys) -> tuple[str, ...]:
  return tuple(f'{side}_{k}' for side in ('chosen', 'rejected') for k in keys)


_HH_TURN = re.compile(r'\n\n(Human|Assistant): ?')
_HH_ROLES = {'Human': 'user', 'Assistant': 'assistant'}


def hh_dialogue(text: str):
  """HH-RLHF's "\n\nHuman: ...\n\nAssistant: ..." string as messages; None if it is not one."""
  if not text.startswith(('\n\nHuman:', 'Human:')):
    return None
  parts = _HH_TURN.split('\n\n' + text if text.startswith('Human:') else text)
  # ['', role, content, role, content, ...]
  return [{'role': _HH_ROLES[role], 'content': content.strip()}
          for role, content in zip(parts[1::2], parts[2::2])]


def _reply(value, where: str, what: str):
  """A reply as text: a string, one message, or the last assistant message of a list."""
  if isinstance(value, str):
    dialogue = hh_dialogue(value)
    if dialogue is not None:
      return _reply(dialogue, where, what)
    return value, None
  if isinstance(value, dict):
    return chat.normalize([value], where)[0]['content'], None
  if isinstance(value, list):
    messages = chat.normalize(value, where)
    if messages[-1]['role'] != 'assistant':
      raise DataError(f'{where}: {what} does not end with an assistant message')
    return messages[-1]['content'], messages[:-1]
  raise DataError(f'{where}: {what} is {type(value).__name__}; expected a string, a message or a '
                  'list of messages')


def from_record(record, fields: dict, where: str = 'record'):
  """-> (prompt messages, chosen text, rejected text)."""
  chosen, chosen_context = _reply(chat.field(record, fields, 'chosen', where), where, 'chosen')
  rejected, rejected_context = _reply(chat.field(record, fields, 'rejected', where), where, 'rejected')
  prompt = chat.field(record, fields, 'prompt', where, required=False)
  if prompt is None and fields.get('conversations', 'conversations') in record:
    prompt = record[fields.get('conversations', 'conversations')]
  if prompt is None:
    if chosen_context is None or chosen_context != rejected_context or not chosen_context:
      raise DataError(f'{where}: no prompt: give a "prompt" (or "conversations") field, or chosen '
                      'and rejected conversations that start with the same prompt')
    prompt = chosen_context
  if isinstance(prompt, str):
    prompt = [{'role': 'user', 'content': prompt}]
  else:
    prompt = chat.normalize(prompt, where)
  system = record.get(fields.get('system', 'system'))
  if isinstance(system, str) and system and prompt[0]['role'] != 'system':
    prompt.insert(0, {'role': 'system', 'content': system})
  if prompt[-1]['role'] == 'assistant':
    raise DataError(f'{where}: the prompt ends with an assistant message; the reply must come next')
  chat.check_order(prompt + [{'role': 'assistant', 'content': chosen}], where)
  if not chosen.strip() or not rejected.strip():
    raise chat.EmptyContent(f'{where}: empty chosen or rejected reply')
  if chosen.strip() == rejected.strip():  # a pair with no preference: its loss is log 2, always
    raise DataError(f'{where}: chosen and rejected replies are the same text; a preference pair '
                    'must differ')
  return prompt, chosen, rejected


def encode(encoder: chat.ChatEncoder, prompt, chosen: str, rejected: str):
  """-> ((ids, mask) chosen, (ids, mask) rejected), sharing the prompt's ids exactly."""
  out = []
  for reply in (chosen, rejected):
    spans = encoder.template.spans(prompt + [{'role': 'assistant', 'content': reply}])
    out.append(encoder.encode_spans(spans, train_on='last'))
  return tuple(out)


# -- unpaired examples (KTO) ----------------------------------------------------------------------
# TRL's unpaired preference format: {prompt, completion, label}; label true (desirable) or false
# (undesirable). prompt as in pairs (a string or messages); completion a string, one message, or a
# conversation whose start is the prompt. A preference pair record also reads as two examples. An encoded example is one (ids, weights) item whose
# weights are +1 on a desirable completion's tokens and -1 on an undesirable one's, so the label
# rides through packing unchanged and the objective reads it back as the sign.


def labelled_from_record(record, fields: dict, where: str = 'record'):
  """-> [(prompt messages, completion text, desirable: bool)]: one example, or two from a
  preference pair (its chosen reply desirable, its rejected one not: TRL's unpairing)."""
  has = lambda name: fields.get(name, name) in record
  if has('chosen') and has('rejected') and not has('completion'):
    prompt, chosen, rejected = from_record(record, fields, where)
    return [(prompt, chosen, True), (prompt, rejected, False)]
  return [_labelled(record, fields, where)]


def _labelled(record, fields: dict, where: str):
  label = chat.field(record, fields, 'label', where, required=False)
  if label is None:
    raise DataError(f'{where}: no field {fields.get("label", "label")!r}: KTO examples need a '
                    'label (true: desirable, false: undesirable); map it with '
                    'data.fields="label=COLUMN"')
  if not isinstance(label, bool) and label not in (0, 1):
    raise DataError(f'{where}: label is {label!r}; expected true (desirable) or false (undesirable)')
  completion, context = _reply(chat.field(record, fields, 'completion', where), where, 'completion')
  prompt = chat.field(record, fields, 'prompt', where, required=False)
  if prompt is None:
    if not context:
      raise DataError(f'{where}: no prompt: give a "prompt" field or a completion conversation '
                      'that starts with it')
    prompt = context
  prompt = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else chat.normalize(prompt, where)
  if prompt[-1]['role'] == 'assistant':
    raise DataError(f'{where}: the prompt ends with an assistant message; the completion must come next')
  chat.check_order(prompt + [{'role': 'assistant', 'content': completion}], where)
  if not completion.strip():
    raise chat.EmptyContent(f'{where}: empty completion')
  return prompt, completion, bool(label)


def encode_labelled(encoder: chat.ChatEncoder, prompt, completion: str):
  """-> (ids, mask) with the mask on the completion (and its end-of-turn token) only."""
  spans = encoder.template.spans(prompt + [{'role': 'assistant', 'content': completion}])
  return encoder.encode_spans(spans, train_on='last')
