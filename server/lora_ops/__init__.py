"""Fast multi-LoRA ops for vLLM's CPU path, installed by a vLLM plugin (see `plugin`)."""
