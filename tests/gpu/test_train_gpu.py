"""On a CUDA GPU: cptkit's varlen attention keeps packed documents apart, and `cptkit train` with
auto attention and the fused loss trains. Run through the device tool: pytest -m gpu tests/gpu."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_varlen_packed_equals_separate(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from cptkit.model import attention
    from cptkit.train.collator import PackedCollator

    assert attention.varlen_available()
    attention.register()
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attention.VARLEN
    )
    model = model.cuda().eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (70, 120, 50, 90, 30)]
    rows = [
        {"input_ids": docs[0] + docs[1] + docs[2], "position_ids": [*range(70), *range(120), *range(50)]},
        {"input_ids": docs[3] + docs[4], "position_ids": [*range(90), *range(30)]},
    ]
    batch = {k: v.cuda() for k, v in PackedCollator(pad_token_id=0)(rows).items()}
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits.float()
        offset = 0
        for row, row_docs in ((0, docs[:3]), (1, docs[3:])):
            offset = 0
            for doc in row_docs:
                alone = model(input_ids=torch.tensor([doc], device="cuda"), use_cache=False).logits.float()[0]
                got = packed[row, offset : offset + len(doc)]
                torch.testing.assert_close(got, alone, atol=2e-2, rtol=2e-2)
                offset += len(doc)


def test_train_on_gpu_with_auto_attention(tmp_path, tiny_model_dir, tiny_tokenizer):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_train import make_cfg, write_dataset

    from cptkit.commands.train import run

    prepared = write_dataset(tmp_path / "prepared", tiny_tokenizer)
    cfg = make_cfg(tmp_path / "out", tiny_model_dir, prepared, mode="full", max_steps=12, schedule="constant")
    run(cfg)
    meta = json.loads((tmp_path / "out" / "run_meta.json").read_text())
    assert meta["attention"].startswith("varlen")
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["type"] == "train"]
    assert losses[-1] < losses[0]
    assert all(x.get("peak_memory_gb") for x in lines if x["type"] == "train")


def test_a_killed_save_resumes_from_the_last_complete_checkpoint_on_gpu(
    tmp_path, tiny_model_dir, tiny_tokenizer
):
    """On the GPU path (varlen attention, fused loss, bf16): checkpoints carry the completion marker, an
    empty newer checkpoint (a save killed mid-way) is skipped, and the resumed run logs each step once with
    the uninterrupted run's losses."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_train import losses, make_cfg, write_dataset

    from cptkit.commands.train import run
    from cptkit.train.checkpoints import COMPLETE_MARKER

    prepared = write_dataset(tmp_path / "prepared", tiny_tokenizer)
    whole = tmp_path / "whole"
    run(make_cfg(whole, tiny_model_dir, prepared, mode="lora", max_steps=6, save_steps=3))
    assert (whole / "checkpoint-3" / COMPLETE_MARKER).is_file()
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(whole / "checkpoint-3", part / "checkpoint-3")
    (part / "checkpoint-6").mkdir()  # killed while saving
    shutil.copy(whole / "run_meta.json", part / "run_meta.json")
    run(make_cfg(part, tiny_model_dir, prepared, mode="lora", max_steps=6, save_steps=3))
    meta = json.loads((part / "run_meta.json").read_text())
    assert meta["resumed_from"].endswith("checkpoint-3") and meta["status"] == "complete"
    resumed, plain = losses(part), losses(whole)
    assert set(resumed) == {4, 5, 6}
    for step in resumed:
        assert abs(resumed[step] - plain[step]) < 1e-3, (resumed, plain)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_regularizers_train_on_the_gpu_path(tmp_path, tiny_model_dir, tiny_tokenizer, mode):
    """On the GPU path (varlen attention, liger's fused loss where installed, bf16): kl_to_base, l2_to_base
    and ewc together, with the per-source loss, train with finite values logged under their own keys; the
    KL starts at 0 (the base is the model at step 0) and the Fisher file is written beside the run."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_train import make_cfg, write_dataset

    from cptkit.commands.train import run

    prepared = write_dataset(tmp_path / "prepared", tiny_tokenizer)
    cfg = make_cfg(tmp_path / "out", tiny_model_dir, prepared, mode=mode, max_steps=6, schedule="constant")
    reg = cfg.train.regularize
    reg.kl_to_base.weight, reg.l2_to_base.weight, reg.ewc.weight, reg.ewc.fisher_rows = 1.0, 0.1, 1.0, 4
    run(cfg)
    meta = json.loads((tmp_path / "out" / "run_meta.json").read_text())
    assert meta["attention"].startswith("varlen") and meta["status"] == "complete"
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    for key in ("loss/kl_to_base", "loss/l2_to_base", "loss/ewc"):
        assert all(key in x and math.isfinite(x[key]) for x in train), key
    for key in ("loss/source/domain", "loss/source/general"):  # where the logged step had its tokens
        values = [x[key] for x in train if key in x]
        assert values and all(math.isfinite(v) for v in values), key
    kl = [x["regularize/kl_to_base"] for x in train]  # 0 on a step whose batch held no replay token
    assert kl[0] < 1e-3 and max(kl) > kl[0]
    from cptkit.paths import EWC_FISHER

    assert (tmp_path / "out" / EWC_FISHER).is_file()
