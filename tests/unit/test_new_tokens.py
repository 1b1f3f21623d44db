"""The rows of added tokens: each new input and output row starts at the exact mean of its base pieces'
rows (tied and untied heads), the noise option adds the stated std, full training of only the new rows
leaves the base rows bit-identical, LoRA trains them as peft's trainable tokens saved with the adapter,
and base rows that look untrained yet occur in the data are found."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.config.train import NewTokensConfig
from cptkit.data.vocabulary_file import NewToken, Vocabulary
from cptkit.errors import CptkitError
from cptkit.model.load import lora_config
from cptkit.model.new_tokens import add_new_token_rows, check_rows_cover_base, freeze_base_rows
from cptkit.model.untrained_rows import check_untrained_rows, suspect_rows

WORDS = [" hypertension", " myocardial", " infarction", " the patient", " diagnosis"]


def vocabulary_for(base_tokenizer, words=WORDS) -> Vocabulary:
    """A Vocabulary of `words` as new ids after the base's, pieces = their base encodings (the train
    side needs only that; how prepare learns them is not what is tested here)."""
    base = len(base_tokenizer)
    tokens = [
        NewToken(
            id=base + k,
            token=w,
            text=w,
            pieces=tuple(base_tokenizer(w, add_special_tokens=False)["input_ids"]),
            count=10,
            saved=10,
        )
        for k, w in enumerate(words)
    ]
    assert all(len(t.pieces) >= 2 for t in tokens)
    return Vocabulary("tiny", "fp", base, base + len(words), "fp2", tokens)


def tiny_llama(vocab_size: int, tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def vocabulary(tiny_tokenizer) -> Vocabulary:
    return vocabulary_for(tiny_tokenizer)


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_exact_means_of_their_pieces_rows(tiny_tokenizer, vocabulary, tied):
    model = tiny_llama(len(tiny_tokenizer), tied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    record = add_new_token_rows(model, vocabulary, NewTokensConfig())
    assert record == {"added": len(WORDS), "size": vocabulary.size, "tied": tied, "init": "mean"}
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape[0] == w_out.shape[0] == vocabulary.size
    assert (w_out is w_in) == tied
    assert torch.equal(w_in[: vocabulary.base_size], before_in)
    assert torch.equal(w_out[: vocabulary.base_size], before_out)
    for t in vocabulary.tokens:
        torch.testing.assert_close(w_in[t.id], before_in[list(t.pieces)].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(w_out[t.id], before_out[list(t.pieces)].mean(0), rtol=0, atol=1e-7)
    if not tied:  # the output rows come from the output matrix, not the input one
        t = vocabulary.tokens[0]
        assert not torch.allclose(w_out[t.id], before_in[list(t.pieces)].mean(0))


def test_noise_has_the_stated_std_and_is_seeded(tiny_tokenizer):
    words = [w + s for w in WORDS for s in ("", "s", "ing", "ed", "al", "ly", "er", "ist")]
    vocabulary = vocabulary_for(tiny_tokenizer, words)
    plain = tiny_llama(len(tiny_tokenizer), tied=False)
    noisy, again = copy.deepcopy(plain), copy.deepcopy(plain)
    base_std = plain.get_input_embeddings().weight.std().item()
    add_new_token_rows(plain, vocabulary, NewTokensConfig())
    cfg = NewTokensConfig(init="mean_noise", noise=0.5)
    add_new_token_rows(noisy, vocabulary, cfg, seed=7)
    add_new_token_rows(again, vocabulary, cfg, seed=7)
    new = slice(vocabulary.base_size, vocabulary.size)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        diff = getattr(noisy, get)().weight[new] - getattr(plain, get)().weight[new]
        assert torch.equal(getattr(noisy, get)().weight, getattr(again, get)().weight)  # seeded
        assert abs(diff.mean().item()) < 0.1 * 0.5 * base_std
        assert diff.std().item() == pytest.approx(0.5 * base_std, rel=0.1)  # 40 rows x 32 draws


@pytest.mark.parametrize("tied", [True, False])
def test_full_training_of_the_new_rows_leaves_the_base_rows_bit_identical(tiny_tokenizer, vocabulary, tied):
    model = tiny_llama(len(tiny_tokenizer), tied=tied)
    add_new_token_rows(model, vocabulary, NewTokensConfig())
    freeze_base_rows(model, vocabulary.base_size)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    embeddings = list({id(m.weight): m.weight for m in rows_modules(model)}.values())
    others = [p for p in model.parameters() if all(p is not e for e in embeddings)]
    optimizer = torch.optim.AdamW(
        [{"params": others, "weight_decay": 0.1}, {"params": embeddings, "weight_decay": 0.0}], lr=1e-2
    )
    ids = torch.tensor([[1, 5, vocabulary.base_size, 7, vocabulary.base_size + 1, 9, vocabulary.size - 1, 3]])
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base = slice(0, vocabulary.base_size)
    assert torch.equal(model.get_input_embeddings().weight[base], before_in[base])
    assert torch.equal(model.get_output_embeddings().weight[base], before_out[base])
    new = slice(vocabulary.base_size, vocabulary.size)
    assert not torch.equal(model.get_input_embeddings().weight[new], before_in[new])
    assert not torch.equal(model.get_output_embeddings().weight[new], before_out[new])


def rows_modules(model):
    return [model.get_input_embeddings(), model.get_output_embeddings()]


def _lora_train_cfg(train: str):
    return build_config(
        Config,
        {
            "model": {"name_or_path": "x"},
            "run_dir": "/tmp/unused-run",
            "train": {
                "mode": "lora",
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "new_tokens": {"train": train},
            },
        },
    ).train


@pytest.mark.parametrize("tied", [True, False])
def test_lora_new_rows_are_saved_with_the_adapter_and_reload_to_the_same_logits(
    tmp_path, tiny_tokenizer, vocabulary, tied
):
    from peft import PeftModel, get_peft_model

    train_cfg = _lora_train_cfg("new")
    base = tiny_llama(len(tiny_tokenizer), tied)
    fresh = copy.deepcopy(base)
    add_new_token_rows(base, vocabulary, train_cfg.new_tokens)
    start = {
        "in": base.get_input_embeddings().weight.detach().clone(),
        "out": base.get_output_embeddings().weight.detach().clone(),
    }
    config = lora_config(train_cfg, base, vocabulary)
    assert set(config.trainable_token_indices) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    model = get_peft_model(base, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n for n in trainable) and not any(
        "modules_to_save" in n for n in trainable
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 5, vocabulary.base_size, 7, vocabulary.base_size + 2, 9, vocabulary.size - 1, 3]])
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        merged = copy.deepcopy(model).merge_and_unload()
    new = slice(vocabulary.base_size, vocabulary.size)
    old = slice(0, vocabulary.base_size)
    w_in, w_out = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.equal(w_in[new], start["in"][new]) and torch.equal(w_in[old], start["in"][old])
    if not tied:
        assert not torch.equal(w_out[new], start["out"][new]) and torch.equal(w_out[old], start["out"][old])
    model.save_pretrained(tmp_path / "adapter")
    add_new_token_rows(fresh, vocabulary, train_cfg.new_tokens)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)


def test_lora_all_trains_the_whole_embeddings_and_head(tiny_tokenizer, vocabulary):
    from peft import get_peft_model

    train_cfg = _lora_train_cfg("all")
    base = tiny_llama(len(tiny_tokenizer), tied=False)
    add_new_token_rows(base, vocabulary, train_cfg.new_tokens)
    config = lora_config(train_cfg, base, vocabulary)
    assert not config.trainable_token_indices and set(config.modules_to_save) == {"embed_tokens", "lm_head"}
    model = get_peft_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert sorted(p.shape[0] for p in trainable.values()) == [vocabulary.size, vocabulary.size]


def test_an_embedding_matrix_smaller_than_its_tokenizer_is_refused():
    with pytest.raises(CptkitError, match="embedding matrix has 500 rows but its tokenizer 512 tokens"):
        check_rows_cover_base(500, 512, "model.name_or_path: base")


class Rows:
    """Training rows as PackedRows serves them (`__getitems__` of dicts with input_ids)."""

    def __init__(self, rows):
        self.rows = [{"input_ids": np.asarray(r, np.int32)} for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitems__(self, indices):
        return [self.rows[i] for i in indices]


@pytest.mark.parametrize("action", ["report", "mean"])
def test_untrained_rows_that_occur_in_the_data_are_found(tiny_tokenizer, action, caplog):
    model = tiny_llama(len(tiny_tokenizer), tied=True)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[[40, 41, 42]] = 0  # zeroed rows: 40 and 41 occur in the data, 42 does not
        weight[[60, 61, 62, 63, 64, 65]] = 0.5  # one placeholder value in six rows: 60 occurs
    rows = Rows([[1, 40, 7, 8, 41, 60, 9, 40]] * 300)  # over one counting chunk
    assert set(suspect_rows(weight, len(tiny_tokenizer)).nonzero().flatten().tolist()) == {
        40,
        41,
        42,
        *range(60, 66),
    }
    record = check_untrained_rows(model, tiny_tokenizer, rows, len(tiny_tokenizer), action)
    entry = record["input embeddings"]
    assert entry["looks_untrained"] == 9 and entry["in_data"] == 3
    assert [e[0] for e in entry["examples"]] == [40, 41, 60]  # most frequent first
    assert entry["examples"][0][1] == tiny_tokenizer.convert_ids_to_tokens(40)
    assert record["counted"] == "the first 300 of 300 training rows" and "lm_head" not in record  # tied
    assert "look untrained" in caplog.text
    if action == "mean":
        trained = [i for i in range(len(tiny_tokenizer)) if i not in (40, 41, 42, *range(60, 66))]
        torch.testing.assert_close(weight[40], weight[trained].mean(0))
        assert torch.equal(weight[42], torch.zeros(32)) and torch.equal(weight[61], torch.full((32,), 0.5))
    else:
        assert torch.equal(weight[40], torch.zeros(32))


def test_trainable_tokens_land_in_the_embedding_learning_rate_group(tiny_tokenizer, vocabulary):
    from peft import get_peft_model

    from cptkit.train.build import _embedding_param_ids

    train_cfg = _lora_train_cfg("new")
    base = tiny_llama(len(tiny_tokenizer), tied=False)
    add_new_token_rows(base, vocabulary, train_cfg.new_tokens)
    model = get_peft_model(base, lora_config(train_cfg, base, vocabulary))
    deltas = {id(p) for n, p in model.named_parameters() if "trainable_tokens" in n and p.requires_grad}
    assert len(deltas) == 2 and deltas == _embedding_param_ids(model)


def test_token_counts_of_a_store_sample_evenly_spaced_windows():
    from cptkit.model.untrained_rows import token_counts

    class Space:
        num_tokens = 1000
        tokens = np.arange(1000) % 50

        def gather(self, start, length):
            return self.tokens[start : start + length].astype(np.int32)

    class StoreRows:
        space = Space()

    counts, what = token_counts(StoreRows(), 50)
    assert what == "all 1,000 training tokens" and (counts == 20).all()
    counts, what = token_counts(StoreRows(), 50, sample_tokens=640)
    assert what == "640 of 1,000 training tokens (64 evenly spaced windows)" and counts.sum() == 640


def test_untrained_rows_are_found_the_same_read_in_chunks(tiny_tokenizer, monkeypatch):
    from cptkit.model import untrained_rows

    weight = tiny_llama(len(tiny_tokenizer), tied=True).get_input_embeddings().weight.detach().clone()
    weight[[3, 200, 450]] = 0
    weight[[10, 100, 300, 400, 500]] = 0.25  # duplicates spread over several chunks
    whole = suspect_rows(weight, len(tiny_tokenizer))
    monkeypatch.setattr(untrained_rows, "CHUNK_ROWS_NORM", 64)
    assert torch.equal(suspect_rows(weight, len(tiny_tokenizer)), whole)
    assert whole.nonzero().flatten().tolist() == [3, 10, 100, 200, 300, 400, 450, 500]
