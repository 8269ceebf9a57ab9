"""Reading and writing models: lm run directories, Hugging Face checkpoints, PEFT adapters, export."""
