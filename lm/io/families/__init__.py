"""Hugging Face families built from lm's parts beyond the Llama shape: one module each, holding
its conversion table (config.json <-> lm model fields, HF tensors <-> lm parameters). The Llama-
shaped families (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, Mixtral, Qwen3-MoE) are lm/io/hf.py's
own tables."""

from lm.io.families import (deepseek_v3, gemma4, glm4_moe, gpt_oss, llama4, olmo3, qwen3_5,
                            qwen3_5_moe, qwen3_next, smollm3)
from lm.io.families.common import Family  # noqa: F401

REGISTRY = {f.model_type: f for f in (smollm3.FAMILY, olmo3.OLMO2, olmo3.OLMO3, llama4.FAMILY,
                                         qwen3_5.FAMILY, qwen3_5_moe.FAMILY, qwen3_next.FAMILY,
                                         deepseek_v3.FAMILY, glm4_moe.FAMILY, gpt_oss.FAMILY,
                                         gemma4.FAMILY)}
