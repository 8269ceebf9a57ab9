"""Evaluation: KV-cache generation, scoring, tasks, text metrics, `lm eval` and `lm compare`."""
