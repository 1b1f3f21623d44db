"""The shipped accelerate presets on two CPU processes (gloo, fp32): `accelerate launch -m cptkit
train` with the same config file trains and saves under DDP and FSDP2, and two DDP ranks of 2 rows
each train the same adapter as one process with 4 rows (plain SGD, so the comparison measures the
training and not Adam's amplification of rounding noise in near-zero gradients)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from cptkit.presets.accelerate import path as preset
from cptkit.train.stall import STALL_ENV

sys.path.insert(0, str(Path(__file__).parent))
from test_train import losses, write_dataset  # noqa: E402

STALL_MARK = "cptkit stall watchdog: rank"
STARTED: list[subprocess.Popen] = []  # launches a failed test may leave running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(
    tmp_path: Path, model_dir: Path, dataset: Path, out: Path, batch: int, eval_steps: int = 1000
) -> Path:
    cfg = {
        "seed": 7,
        "model": {"name_or_path": str(model_dir)},
        "train": {
            "mode": "lora",
            "dataset": str(dataset),
            "output_dir": str(out),
            "report_to": ["none"],
            "eval_steps": eval_steps,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "gradient_checkpointing": False,
            "hf": {
                "max_steps": 4,
                "per_device_train_batch_size": batch,
                "optim": "sgd",
                "learning_rate": 0.5,
                "logging_steps": 1,
                "save_steps": 2,
                "dataloader_drop_last": True,
            },
        },
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(tmp_path: Path, engine: str | None, config: Path, module: str = "cptkit", **env: str):
    """`module train CONFIG` launched (one process, or two through the `engine` preset on CPU), stdout
    and stderr into files; returns the process and the stderr file."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # SIGABRT makes each process write its Python stack
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    arguments = [str(config)] if module == "held_train" else ["train", str(config)]
    if engine is None:
        command = [sys.executable, "-m", module, *arguments]
    else:
        on_cpu = tmp_path / f"{engine}-cpu.yaml"
        text = preset(engine).read_text().replace("use_cpu: false", "use_cpu: true")
        on_cpu.write_text(text.replace("mixed_precision: bf16", "mixed_precision: 'no'"))  # fp32 on CPU
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(on_cpu),
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            module,
            *arguments,
        ]
    name = config.stem
    err = tmp_path / f"{name}.stderr"
    with open(tmp_path / f"{name}.stdout", "w") as out, open(err, "w") as errors:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=errors)
    STARTED.append(process)
    return process, err


def _family(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process under it (torchrun starts each rank in a session of its own,
    so a signal to the launcher's process group does not reach the ranks)."""
    try:
        root = psutil.Process(process.pid)
        return [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []


def _signal(processes: list[psutil.Process], number: int) -> None:
    for one in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            one.send_signal(number)


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and each rank, as a machine's crash or an OOM killer would."""
    family = _family(process)
    _signal(family, signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    process.wait()


def _abort(process: subprocess.Popen, err: Path) -> str:
    """SIGABRT to the launcher and every rank (with PYTHONFAULTHANDLER each writes its Python stack
    and ends), SIGKILL to any left; returns the stacks written to the launch's stderr."""
    family = _family(process)
    _signal(family, signal.SIGABRT)
    _, alive = psutil.wait_procs(family, timeout=30)
    _signal(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=30)
    process.wait()
    text = err.read_text(errors="replace")
    first = min((i for i in (text.find("Fatal Python error"), text.find(STALL_MARK)) if i >= 0), default=0)
    return text[first:][-20000:]


@pytest.fixture(autouse=True)
def _no_launch_left():
    """A test that fails while its launch runs (a held rank sleeps for minutes) leaves nothing running."""
    yield
    while STARTED:
        _kill(STARTED.pop())


def _launch(tmp_path: Path, engine: str | None, config: Path, timeout: float = 300, **env: str) -> None:
    """Run a launch to its end; one past `timeout` fails with every process's Python stack."""
    process, err = _start(tmp_path, engine, config, **env)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = _abort(process, err)
        pytest.fail(f"{engine or 'one process'} launch still running after {timeout} s; stacks:\n{stacks}")
    assert code == 0, err.read_text(errors="replace")[-3000:]


def _wait_for(err: Path, process: subprocess.Popen, done, timeout: float = 240) -> str:
    """stderr once `done(stderr)` holds; a launch that ends first or takes past `timeout` fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = err.read_text(errors="replace")
        if done(text):
            return text
        if process.poll() is not None:
            pytest.fail(f"the launch ended (exit {process.returncode}) first:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"not seen in {timeout} s; stacks:\n{_abort(process, err)}")


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizer):
    return write_dataset(tmp_path_factory.mktemp("prepared"), tiny_tokenizer)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, dataset):
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "single"
    _launch(tmp, None, _config(tmp, tiny_model_dir, dataset, out, batch=4))
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir, dataset):
    """The uninterrupted two-process run of an engine, launched once for the tests that read it."""
    runs: dict[str, Path] = {}

    def run(engine: str) -> Path:
        if engine not in runs:
            tmp = tmp_path_factory.mktemp(engine)
            _launch(tmp, engine, _config(tmp, tiny_model_dir, dataset, tmp / engine, batch=2))
            runs[engine] = tmp / engine
        return runs[engine]

    return run


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_and_save_like_one(launched, single, engine):
    out = launched(engine)
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["world_size"] == 2
    assert set(losses(out)) == {1, 2, 3, 4}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for line in (x for x in lines if x["type"] == "train"):  # the loss terms' metrics are all ranks' too
        assert line["loss/causal_lm"] == pytest.approx(line["loss"], rel=1e-4)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    one, two = _adapter(single), _adapter(out)
    assert one.keys() == two.keys()  # the whole adapter, gathered from the shards under FSDP2
    for name, tensor in one.items():
        assert two[name].shape == tensor.shape and torch.isfinite(two[name]).all()
    moved = [n for n in two if "lora_B" in n and two[n].abs().max() > 0]
    assert moved, "lora_B starts at zero; training must have moved it"
    if engine == "ddp":  # 2 ranks x 2 rows are the 4 rows one process takes: the same training
        for name, tensor in one.items():
            torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4)


def _train_steps(folder: Path) -> list[int]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["type"] == "train"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_killed_run_resumes_at_its_checkpoint_like_the_uninterrupted_run(
    tmp_path, tiny_model_dir, dataset, launched, engine
):
    """Both ranks held just after checkpoint-2 is complete, the whole launch killed there (SIGKILL),
    the same config launched again: it resumes at checkpoint-2, logs steps 1 to 4 once each, and its
    losses and adapter are the uninterrupted run's (plain SGD keeps no state; 1e-5 on the losses,
    1e-6 on the adapter: the same arithmetic, only reloaded from fp32 files)."""
    whole = launched(engine)
    out = tmp_path / "part"
    config = _config(tmp_path, tiny_model_dir, dataset, out, batch=2)
    process, err = _start(tmp_path, engine, config, module="held_train", HELD_AT="save:2:0,1")
    _wait_for(err, process, lambda text: text.count("held at save 2") == 2)
    assert (out / "checkpoint-2" / "cptkit_complete.json").is_file()
    _kill(process)
    assert json.loads((out / "run_meta.json").read_text())["status"] == "running"
    assert not (out / "checkpoint-4").exists()

    _launch(tmp_path, engine, config)
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from"].endswith("checkpoint-2")
    assert _train_steps(out) == [1, 2, 3, 4]
    resumed, plain = losses(out), losses(whole)
    for step in (3, 4):
        assert abs(resumed[step] - plain[step]) < 1e-5, (resumed, plain)
    one, two = _adapter(whole), _adapter(out)
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-6, rtol=1e-5)


def _stall_dumps(text: str) -> dict[int, str]:
    """The watchdog's dumps in a launch's stderr by rank (each dump is written whole)."""
    dumps: dict[int, str] = {}
    for part in text.split(STALL_MARK)[1:]:
        dumps.setdefault(int(part.split()[0]), part)
    return dumps


def test_a_stalled_rank_shows_every_ranks_stack(tmp_path, tiny_model_dir, dataset):
    """Rank 1 sleeps after step 2 while rank 0 goes on and waits for it: with CPTKIT_STALL_DUMP_S each
    rank writes its own stack, rank 1's in the sleep, rank 0's in the Trainer; SIGABRT (`_launch`'s
    way with a launch past its timeout) then makes every process write its stack too."""
    config = _config(tmp_path, tiny_model_dir, dataset, tmp_path / "stalled", batch=2)
    process, err = _start(
        tmp_path, "ddp", config, module="held_train", HELD_AT="step_end:2:1", **{STALL_ENV: "3"}
    )
    text = _wait_for(err, process, lambda text: set(_stall_dumps(text)) == {0, 1})
    dumps = _stall_dumps(text)
    assert "held_train.py" in dumps[1] and "_maybe_hold" in dumps[1], dumps[1]
    assert "_maybe_hold" not in dumps[0] and "transformers/trainer.py" in dumps[0], dumps[0]
    assert " of 2: " in dumps[0] and "since step 2 ended" in dumps[0]
    aborted = _abort(process, err)
    assert aborted.count("Fatal Python error: Aborted") >= 2, aborted[-3000:]  # the ranks (and launcher)
    after = aborted[aborted.index("Fatal Python error: Aborted") :]
    assert "_maybe_hold" in after and "transformers/trainer.py" in after, after[-3000:]


def test_fsdp2_evaluates_saves_and_logs_at_every_step(tmp_path, tiny_model_dir, dataset):
    """FSDP2's paths that can hang on several GPUs, on two CPU ranks: held-out evaluation at every
    step (and the baseline at step 0), a save mid-run and at the end, a log line at every step; the
    launch ends in time (or fails with every rank's stack)."""
    out = tmp_path / "fsdp2-eval"
    config = _config(tmp_path, tiny_model_dir, dataset, out, batch=2, eval_steps=1)
    _launch(tmp_path, "fsdp2", config, timeout=240, **{STALL_ENV: "60"})
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["world_size"] == 2
    assert _train_steps(out) == [1, 2, 3, 4]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x["type"] == "eval"]
    sets = {x["set"] for x in evals}
    assert sets and {(x["set"], x["step"]) for x in evals} == {(s, step) for s in sets for step in range(5)}
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in evals)
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "cptkit_complete.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
