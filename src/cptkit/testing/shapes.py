"""Model shapes of real sizes, for what needs no weights (the memory plan, `cptkit plan`, FLOPs)."""

from __future__ import annotations

# Llama-3-8B (8,030,261,248 parameters), the shape of the bench's runs and of the calibration table
LLAMA3_8B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
