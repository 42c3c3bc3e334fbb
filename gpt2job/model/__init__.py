"""The model layer: GPT-2 config and presets, weight loaders (safetensors, flat float32), the tokenizer, the
NumPy GPT-2 (the reference every kernel is tested against) and token selection."""
