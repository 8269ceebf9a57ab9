"""Evaluation settings for `lm eval` and `lm compare` (lm/eval/tasks.py Settings), overridable as
--config.limit=20 etc.

  lm eval runs/quickstart runs/gsm8k_full --config configs/eval/default.py --out runs/eval
  lm eval runs/quickstart --config configs/eval/default.py:quick --out runs/eval_quick   # a few examples
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict(dict(
      runs='',  # comma-separated [NAME=]RUN_DIR[@STEP]; positional arguments take precedence
      tasks='gsm8k,gsm8k_nll,gsm8k_choice,wiki_ppl,wiki_cloze',
      limit=100,  # examples per task; 0 = the whole held-out split
      shots=0,
      max_new_tokens=160,
      temperature=0.0,  # 0: greedy
      top_k=0,
      top_p=1.0,
      batch_size=16,
      seed=0,
      heldout_from='',
      stride=0,  # perplexity: tokens scored per window; 0 = window - 1 (no overlap)
  ))
  if arg == 'quick':
    c.update(limit=8, max_new_tokens=32)
  return c
