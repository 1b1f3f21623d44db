"""What one training step keeps in GPU memory besides weights and optimizer state, per token: the
tensors autograd saves for the backward of a decoder block, one documented term per tensor, what the
loss's logits take, and the transient workspace. `cptkit.train.memory` sums them into an estimate.
`shape` is a `cptkit.model.shape.ModelShape`, `setup` a `cptkit.train.memory.MemorySetup`."""

from __future__ import annotations

import math
from typing import Any

CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # cuBLAS/cuBLASLt workspaces the caching allocator holds


def block_saved_bytes(shape: Any, setup: Any) -> dict[str, float]:
    """Bytes per token autograd keeps for the backward of ONE decoder block that does not recompute,
    one term per saved tensor (a Llama-style block: RMSNorm, attention, RMSNorm, SwiGLU MLP).

    e is the compute dtype's size (2 in bf16, 4 in fp32); h hidden, kv kv_heads x head_dim, f the MLP's
    width. The stock RMSNorm upcasts its input to fp32 and keeps that (4h); liger's keeps it as is (eh);
    both keep one fp32 rstd per token. Attention (flash/SDPA) keeps q, k, v after RoPE, its output and
    a logsumexp per head (fp32). The stock SwiGLU keeps gate, act(gate) and up for the product and the
    product for down_proj (4f); liger's SwiGLU recomputes act(gate) (3f); cptkit's fused LoRA MLP keeps
    only gate and up (2f).
    Stock peft under autocast casts each adapted linear's input to fp32 and lora_A casts it back: one
    copy in e of every adapted input is kept (q, k, v each their own); a 4-bit base skips that cast, and
    the fused LoRA path (fast_lora) keeps none. Each adapter keeps x A^T (r values). Dropout > 0 keeps
    its mask (1 byte) and, where no copy was made, the dropped input."""
    e, h, f = setup.dtype_bytes, shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    norm_input = e * h if setup.fused_norm else 4 * h
    terms: dict[str, float] = {
        "attn_norm_input": norm_input + 4,
        "attn_norm_output": e * h,  # q/k/v input, shared
        "q_after_rope": e * q,
        "k_after_rope": e * kv,
        "v": e * kv,
        "attn_output": e * q + 4 * shape.heads,  # + logsumexp
        "o_proj_input": e * q,
        "mlp_norm_input": norm_input + 4,  # the post-attention residual
        "mlp_norm_output": e * h,  # gate/up input, shared
        "gate": e * f,
        "up": e * f,
    }
    if not setup.fused_mlp:  # cptkit's fused LoRA MLP recomputes act(gate) * up in its backward
        terms["down_proj_input"] = e * f  # act(gate) * up
        if not setup.fused_swiglu:  # liger's SwiGLU recomputes act(gate)
            terms["act_gate"] = e * f
    if setup.mode == "full":
        terms["norm_weight_grad_inputs"] = 2 * e * h  # normed inputs kept for the norms' weight gradients
    if setup.lora:
        adapted = shape.adapted(setup.lora_targets)
        inputs = sum(i for i, _ in adapted.values())
        terms["lora_intermediates"] = e * setup.lora_r * len(adapted)
        copies = setup.mode == "lora" and not setup.fast_lora
        if copies:
            terms["lora_input_copies"] = e * inputs
        if setup.lora_dropout > 0:
            terms["lora_dropout_masks"] = inputs
            if not copies:
                terms["lora_dropped_inputs"] = e * inputs
    return terms


def head_saved_bytes(shape: Any, setup: Any) -> int:
    """Bytes per token kept after the last block: the final norm's input (fp32 in the stock RMSNorm)
    and rstd, and the lm_head's input."""
    e = setup.dtype_bytes
    return (e if setup.fused_norm else 4) * shape.hidden + 4 + e * shape.hidden


def liger_chunk_tokens(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens whose logits liger's fused linear cross-entropy computes at once: it sizes a chunk so its
    logits hold about as many values as the hidden states (next power of two of tokens / ceil(V / h),
    liger 0.8.5 with its default chunk_mem_const of 1)."""
    return min(tokens, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden))))))


def logits_bytes(shape: Any, setup: Any) -> int:
    """Without the fused loss: bf16 logits, their fp32 upcast's log-softmax kept for the backward and
    its fp32 gradient (e + 4 + 4 bytes per token and vocabulary entry). With liger's fused loss (0.8.5):
    one chunk's logits in e (its kernel writes their gradient in place), and the input gradient it
    computes in the forward and keeps for the backward (e x h a token)."""
    tokens, e, vocab = setup.tokens, setup.dtype_bytes, shape.vocab
    if not setup.fused_cross_entropy:
        return tokens * vocab * (e + 4 + 4)
    chunk = liger_chunk_tokens(tokens, shape.hidden, vocab)
    return chunk * vocab * e + tokens * shape.hidden * e


def workspace_bytes(shape: Any, setup: Any) -> int:
    """cuBLAS workspace, the largest linear output of a block and its gradient (transient), in qlora one
    block linear dequantised to the compute dtype for its matmul, and with sharded weights two blocks
    gathered whole (the one computing and the one prefetched)."""
    e = setup.dtype_bytes
    widest = max((o for _, o in shape.block_linears.values()), default=shape.hidden)
    largest = max((i * o for i, o in shape.block_linears.values()), default=0)
    dequantised = largest * e if setup.mode == "qlora" else 0
    gathered = 2 * shape.block_params * e if setup.shards > 1 else 0
    return CUBLAS_WORKSPACE_BYTES + 2 * setup.tokens * widest * e + dequantised + gathered
