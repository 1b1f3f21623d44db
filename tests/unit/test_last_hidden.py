"""The loss terms' final hidden states come from a hook on the decoder's final norm: the same tensor
`output_hidden_states=True` would give as its last entry, for a plain and a peft-wrapped model, without
keeping every layer's."""

from __future__ import annotations

import torch

from cptkit.train.heads import capturing_last_hidden, final_norm


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _same_as_output_hidden_states(model) -> None:
    ids = torch.tensor([[1, 5, 9, 13, 4, 8]])
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        with capturing_last_hidden(model) as captured:
            model(input_ids=ids, use_cache=False)
    assert captured is not None and len(captured) == 1
    torch.testing.assert_close(captured[0], reference, rtol=0, atol=0)


def test_the_hook_gives_the_last_hidden_state(tiny_model_dir):
    model = _model(tiny_model_dir)
    _same_as_output_hidden_states(model)
    assert not model.model.norm._forward_hooks  # removed on leaving


def test_through_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert final_norm(model) is model.get_base_model().model.norm
    _same_as_output_hidden_states(model)


def test_a_model_without_a_final_norm_falls_back():
    with capturing_last_hidden(torch.nn.Linear(2, 2)) as captured:
        assert captured is None
