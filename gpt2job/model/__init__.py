"""The model layer: GPT-2 config and presets, weight loaders (a Hugging Face folder: hf_dir.py over safetensors_io.py;
the flat float32 file: weights.py) and models by name from the local Hugging Face cache (hub.py), the tokenizer, the
NumPy GPT-2 (the reference every kernel is tested against), token selection, log-probabilities (logprobs.py) and stop
strings (stops.py)."""
