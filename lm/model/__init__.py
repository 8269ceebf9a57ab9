"""The model: the decoder (transformer), attention dispatch, LoRA adapters and Pallas kernels."""
