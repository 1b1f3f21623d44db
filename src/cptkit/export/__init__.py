"""GGUF export: a full HF model folder -> one .gguf file llama.cpp runs, with the tokenizer in its metadata,
checked by loading it back (transformers' GGUF loader, llama-cpp-python where installed)."""
