"""The shape of a causal LM as the memory plan and `cptkit plan` need it: sizes of the decoder block's
linear layers and the parameter counts around them, read from a transformers config (the model built on
the meta device: no weights, no memory) or from a model already loaded (peft-wrapped, maybe 4-bit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one model. `block_linears` maps each linear layer of ONE decoder block (its name inside
    the block, e.g. `self_attn.q_proj`, `mlp.down_proj`) to (in_features, out_features); every block of
    the model has the same ones. `block_other_params` counts a block's other parameters (norms, biases
    of nothing else); `other_params` what sits outside the blocks besides the embeddings and lm_head
    (the final norm). `head_params` is 0 when the lm_head shares the input embeddings."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    block_linears: dict[str, tuple[int, int]]
    block_other_params: int
    embedding_params: int
    head_params: int
    other_params: int = 0

    @property
    def block_linear_params(self) -> int:
        """Weights of one block's linear layers (what QLoRA stores in 4 bits)."""
        return sum(i * o for i, o in self.block_linears.values())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + self.block_other_params

    def total_params(self) -> int:
        """Every parameter of the model (the tied lm_head counted once)."""
        return self.layers * self.block_params + self.embedding_params + self.head_params + self.other_params

    def adapted(self, targets: list[str] | str) -> dict[str, tuple[int, int]]:
        """The block linears LoRA adapts for `train.lora.target_modules`: `all-linear`, or names matched
        as peft matches them (the whole name, or its last components)."""
        if targets == ALL_LINEAR:
            return dict(self.block_linears)
        if isinstance(targets, str):
            targets = [targets]
        return {
            name: size
            for name, size in self.block_linears.items()
            if any(name == t or name.endswith("." + t) for t in targets)
        }

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """LoRA adapter parameters of rank `r` on `targets` over all blocks: r x (in + out) per layer."""
        return self.layers * sum(r * (i + o) for i, o in self.adapted(targets).values())


def shape_from_config(config: Any, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model `config` (a transformers config) describes, built on the meta device so
    no weights are allocated (seconds on a CPU for an 8B model)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return shape_of_model(model)


def shape_of_model(model: Any) -> ModelShape:
    """The shape of a loaded causal LM (plain, peft-wrapped, 4-bit): sizes read from the modules, so
    what peft added (lora_A/lora_B, modules_to_save copies) is left out."""
    config = model.config
    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found")
    linears = _block_linears(blocks[0])
    block_other = sum(_numel(p) for name, p in _base_parameters(blocks[0]) if _owner(name) not in linears)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is None or _same_weight(embedding, head)
    embedding_params = embedding.weight.numel()
    head_params = 0 if tied else head.weight.numel()
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    around = {id(p) for m in (embedding, head) if m is not None for p in m.parameters()}
    other = sum(
        _numel(p)
        for name, p in _base_parameters(model)
        if id(p) not in in_blocks and id(p) not in around and not _is_embedding_copy(name)
    )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return ModelShape(
        model_type=text.model_type,
        hidden=hidden,
        layers=len(blocks),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab=embedding.weight.shape[0],
        tied_embeddings=tied,
        block_linears=linears,
        block_other_params=block_other,
        embedding_params=embedding_params,
        head_params=head_params,
        other_params=other,
    )


def decoder_blocks(model: Any) -> list[Any]:
    """The model's decoder blocks in order: the modules of its largest ModuleList of identical
    classes (`model.layers` in Llama-style models), found through peft's wrappers."""
    import torch

    best: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()):
                best = list(module)
    return best


def _block_linears(block: Any) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of the block's own linear layers: nn.Linear and bitsandbytes' subclasses, the
    peft wrapper's `base_layer` taken under the wrapper's name, lora_A/lora_B left out."""
    import torch

    found = {}
    for name, module in block.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or not isinstance(module, torch.nn.Linear):
            continue
        key = ".".join(p for p in parts if p != "base_layer")
        found[key] = (module.in_features, module.out_features)
    return found


def _base_parameters(module: Any) -> list[tuple[str, Any]]:
    """Named parameters without peft's adapters (lora_*, modules_to_save copies)."""
    return [
        (name, p)
        for name, p in module.named_parameters()
        if not any(part.startswith("lora_") for part in name.split("."))
    ]


def _owner(param_name: str) -> str:
    """The block linear a parameter belongs to (`mlp.up_proj.base_layer.weight` -> `mlp.up_proj`)."""
    parts = [p for p in param_name.split(".")[:-1] if p != "base_layer"]
    return ".".join(parts)


def _is_embedding_copy(name: str) -> bool:
    return "modules_to_save" in name.split(".")


def _numel(param: Any) -> int:
    """Logical size of a parameter: bitsandbytes' packed 4-bit weights report their unpacked shape in
    `quant_state` (a packed uint8 holds two values)."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for d in state.shape:
            n *= int(d)
        return n
    return param.numel()


def _same_weight(a: Any, b: Any) -> bool:
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    if wa is None or wb is None:
        return False
    if wa is wb:
        return True
    if wa.device.type == "meta" or wb.device.type == "meta":
        return False
    return wa.data_ptr() == wb.data_ptr()
