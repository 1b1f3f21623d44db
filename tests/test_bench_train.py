"""bench/train.py on a CPU: the data it prepares, the variant matrix, a tiny `all` (a failure recorded and
the next variant run, unsloth skipped where it cannot run, the JSON written), the table's ratios and the
calibration table `cptkit plan` reads."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train.py"
WORDS = "the of and to in data model train token query table index select where join value row page".split()


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def tiny_all(data: Path, tmp_path: Path, *args: str, timeout: float = 300) -> dict:
    """`all --tiny` into tmp_path/out; the results JSON (the call must succeed)."""
    out = tmp_path / "out"
    done = bench(
        "all",
        "--tiny",
        *args,
        f"--data={data}",
        f"--models={tmp_path / 'models'}",
        f"--out={out}",
        f"--work={tmp_path / 'work'}",
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "train.json").read_text())
    report["stdout"] = done.stdout
    return report


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    (root / "corpora").mkdir()
    rng = random.Random(0)
    with gzip.open(root / "corpora" / "a.jsonl.gz", "wt") as f:
        for _ in range(60):
            f.write(
                json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))}) + "\n"
            )
    done = bench("data", f"--out={root / 'data'}", f"--corpora={root / 'corpora'}", "--vocab=400")
    assert done.returncode == 0, done.stderr
    return root / "data"


def test_data_prepares_rows_that_restart_positions_at_each_document(data):
    import datasets
    import numpy as np

    from cptkit.data.prepared import Prepared

    prepared = Prepared.load(data / "prepared")
    rows = prepared.train_rows()
    docs = datasets.load_from_disk(str(data / "docs"))
    assert prepared.seq_length == 2048 and prepared.totals["rows"] == len(rows)
    # no document is longer than a row here: each is one segment, whole, of some row
    segments = [
        tuple(part.tolist())
        for r in rows
        for part in np.split(r["input_ids"], (r["position_ids"] == 0).nonzero()[0][1:])
    ]
    assert sorted(segments) == sorted(tuple(d) for d in docs["input_ids"])


def test_list_names_every_variant_and_group():
    done = bench("list")
    assert done.returncode == 0, done.stderr
    for name in ("cptkit-lora-d05-ckpt", "unsloth-qlora-offload", "seed-lora", "cptkit-seed-preset"):
        assert name in done.stdout
    for group in ("issue", "default", "budget24", "long", "full1b", "seed-preset", "kernels"):
        assert f"  {group} " in done.stdout
    assert "512x4 r32/a8" in done.stdout  # the seed preset's settings, read from the shipped file


def test_unknown_variant_is_refused_with_where_to_look(data, tmp_path):
    done = bench("all", "--tiny", "--variants=cptkit-lora-fast", f"--data={data}", f"--out={tmp_path}")
    assert done.returncode != 0 and "bench/train.py list" in done.stderr


def test_all_tiny_records_a_failure_skips_unsloth_and_trains_the_next(data, tmp_path):
    own = tmp_path / "data"
    shutil.copytree(data, own)
    (own / "prepared-64").mkdir()  # the seed preset's rows (512 / 8 under --tiny): a broken folder
    (own / "prepared-64" / "manifest.json").write_text("{}")
    variants = "--variants=cptkit-seed-preset,unsloth-lora-nockpt,cptkit-lora-default"
    report = tiny_all(
        own, tmp_path, "--no-checks", variants, "--set=train.hf.max_grad_norm=0.5", "--steps=3", "--skip=1"
    )
    (failure,) = report["failures"]
    assert failure["variant"] == "cptkit-seed-preset" and failure["rc"] != 0
    assert any("prepared-64" in line for line in failure["log_tail"])
    assert [s["variant"] for s in report["skipped"]] == ["unsloth-lora-nockpt"]
    assert "unsloth" in report["skipped"][0]["reason"]
    (run,) = report["runs"]
    assert run["variant"] == "cptkit-lora-default" and run["runner"] == "cptkit"
    assert run["tokens_per_second"] > 0 and run["timed_steps"] == 2 and len(run["losses"]) == 3
    assert (run["seq_length"], run["micro_batch"], run["lora"]["dropout"]) == (256, 2, 0.0)
    assert run["params"] > 0 and run["checkpointing"] == "auto"
    assert {"memory_plan", "kernels", "attention", "overrides"} <= set(run)
    assert {"train.gradient_checkpointing=auto", "train.hf.max_grad_norm=0.5"} <= set(run["overrides"])
    table = {
        line.split()[0]: line for line in report["stdout"].splitlines() if line.startswith(("cptkit", "uns"))
    }
    assert "failed" in table["cptkit-seed-preset"] and "skipped" in table["unsloth-lora-nockpt"]
    assert table["cptkit-lora-default"].split()[1].isdigit()  # its tokens/s


def test_a_variant_past_its_time_limit_is_stopped_and_recorded(data, tmp_path):
    report = tiny_all(data, tmp_path, "--no-checks", "--variants=cptkit-lora-default", "--variant-timeout=1")
    (failure,) = report["failures"]
    assert str(failure["rc"]).startswith("stopped after 1 s")


@pytest.mark.slow
def test_all_tiny_with_the_checks_qlora_and_the_seed_preset_pair(data, tmp_path):
    chosen = ("--variants=cptkit-qlora-d0-nockpt", "--group=seed-preset")
    report = tiny_all(data, tmp_path, *chosen, "--steps=3", "--skip=1", timeout=900)
    assert {i["attention"] for i in report["isolation"]} >= {"sdpa", "eager"}
    assert all(
        i["max_abs_diff_packed_vs_alone"] < 1e-4 for i in report["isolation"] if i["dtype"] == "float32"
    )
    names = [r["variant"] for r in report["runs"]]
    assert names == ["cptkit-qlora-d0-nockpt", "cptkit-seed-preset", "seed-at-preset"], report["failures"]
    assert (data / "prepared-64" / "manifest.json").exists()  # the preset's rows, packed at their length
    preset = next(r for r in report["runs"] if r["variant"] == "cptkit-seed-preset")
    assert preset["lora"]["target_modules"] == ["q_proj", "v_proj"] and preset["lora"]["r"] == 32
    line = next(x for x in report["stdout"].splitlines() if x.startswith("cptkit-seed-preset"))
    assert line.split()[-4].endswith("x")  # the ratio to the seed's recipe at the same settings


def run(variant, runner, mode, tps, mfu=0.3, seq=2048, batch=8, r=16, plan=None, kernels=None, ckpt="auto"):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "variant": variant,
        "runner": runner,
        "mode": mode,
        "params": 8030261248,
        "seq_length": seq,
        "micro_batch": batch,
        "lora": {"r": r, "alpha": 32, "dropout": 0.0, "target_modules": targets},
        "checkpointing": ckpt,
        "tokens_per_second": tps,
        "mfu": mfu,
        "peak_memory_gib": 70.0,
        "losses": {"1": 12.5, "2": 12.4},
        "memory_plan": plan,
        "kernels": kernels,
    }


REPORT = {
    "date": "2026-12-02",
    "device": "NVIDIA H200",
    "versions": {"torch": "2.11.0"},
    "runs": [
        run(
            "cptkit-lora-default",
            "cptkit",
            "lora",
            17136.0,
            0.58,
            plan={"checkpointing": "none", "estimate": {"total": 80 * 2**30}},
            kernels={"fast_lora": True},
        ),
        run("cptkit-qlora-d0-ckpt", "cptkit", "qlora", 10000.0, ckpt="true"),
        {
            **run("cptkit-lora-offload", "cptkit", "lora", 9000.0),
            "fast_lora": {"layers": 224, "mlps": 32},
            "memory_plan": {"checkpointing": "offload", "predicted_peak_bytes": 3 * 2**29},
        },
        run("unsloth-lora-offload", "unsloth", "lora", 10929.0, ckpt="unsloth"),
        run("unsloth-lora-nockpt", "unsloth", "lora", 15580.0, ckpt="false"),
        run("seed-lora", "seed", "lora", 3348.0, ckpt="true"),
    ],
    "failures": [{"variant": "cptkit-full-1b-default", "rc": 1}],
    "skipped": [],
}


def test_table_states_each_run_against_unsloths_fastest_and_the_seed(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(REPORT))
    done = bench("table", str(path))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("cptkit-lora-default"))
    assert "1.10x" in line and "5.12x" in line and "80.0" in line and "58.0%" in line
    qlora = next(x for x in done.stdout.splitlines() if x.startswith("cptkit-qlora-d0-ckpt"))
    assert qlora.split()[4:8] == ["-", "all", "-", "-"]  # no prediction, no qlora unsloth or seed run
    assert "cptkit-full-1b-default" in done.stdout and "failed: 1" in done.stdout


def test_calibration_table_has_the_agreed_format(tmp_path):
    path, out = tmp_path / "train.json", tmp_path / "calibration.json"
    path.write_text(json.dumps(REPORT))
    done = bench("calibration", str(path), f"--out={out}")
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert table["measured"] == "2026-12-02" and table["device"] == "NVIDIA H200"
    assert table["peak_bf16_tflops"] == 989 and table["versions"] == {"torch": "2.11.0"}
    assert table["source"] == str(path)
    assert [r["variant"] for r in table["rows"]] == [
        "cptkit-lora-default",
        "cptkit-qlora-d0-ckpt",
        "cptkit-lora-offload",
    ]
    first, second, third = table["rows"]
    assert set(first) == {
        "variant",
        "mode",
        "params",
        "seq_length",
        "micro_batch",
        "checkpointing",
        "fast_lora",
        "tokens_per_second",
        "mfu",
        "peak_gib",
        "predicted_peak_gib",
    }
    assert (first["checkpointing"], first["fast_lora"], first["predicted_peak_gib"]) == ("none", True, 80.0)
    assert (second["checkpointing"], second["fast_lora"], second["predicted_peak_gib"]) == (
        "all",
        False,
        None,
    )


def test_calibration_joins_the_calls_of_one_device_and_refuses_two_devices(tmp_path):
    first, second, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(json.dumps(REPORT))
    second.write_text(
        json.dumps({**REPORT, "date": "2026-12-03", "runs": [run("cptkit-full-1b", "cptkit", "full", 5e4)]})
    )
    assert bench("calibration", str(first), str(second), f"--out={out}").returncode == 0
    table = json.loads(out.read_text())
    assert table["rows"][-1]["variant"] == "cptkit-full-1b" and len(table["rows"]) == 4
    assert table["measured"] == "2026-12-02" and table["source"] == f"{first}, {second}"
    second.write_text(json.dumps({**REPORT, "device": "NVIDIA A100-SXM4-80GB"}))
    done = bench("calibration", str(first), str(second), f"--out={tmp_path / 'd.json'}")
    assert done.returncode != 0 and "different devices" in done.stderr


def test_calibration_refuses_results_without_a_measured_cptkit_run(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**REPORT, "runs": [r for r in REPORT["runs"] if r["runner"] != "cptkit"]}))
    done = bench("calibration", str(path), f"--out={tmp_path / 'c.json'}")
    assert done.returncode != 0 and "no cptkit run" in done.stderr
    assert not (tmp_path / "c.json").exists()
