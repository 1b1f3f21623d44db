"""Measuring one child process while it runs: its process tree's memory sampled from /proc (RSS, and
apart the anonymous pages it allocated and the file pages it mapped), a watchdog that stops it before the
machine runs out of memory, its CPU time, and how much of the machine others used meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

GB = 1 << 30


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of one process, in bytes (empty once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


class TreeSampler(threading.Thread):
    """Samples the memory of a process and its descendants every `interval` s until `stop()`; stops the
    tree (its process group) when its anonymous memory passes `max_anon` or the machine's available
    memory falls below `min_available` (file pages do not count: the kernel drops them first)."""

    def __init__(self, pid: int, interval: float, max_anon: int, min_available: int):
        super().__init__(daemon=True)
        self.pid, self.interval, self.max_anon, self.min_available = pid, interval, max_anon, min_available
        self.start_time = time.perf_counter()
        self.samples: list[tuple[float, int, int, int]] = []  # (s, rss, anon, file + shmem)
        self.stopped_for: str | None = None
        self._done = threading.Event()

    def tree(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            mems = [proc_memory(pid) for pid in self.tree()]
            rss = sum(m.get("VmRSS", 0) for m in mems)
            anon = sum(m.get("RssAnon", 0) for m in mems)
            file = sum(m.get("RssFile", 0) + m.get("RssShmem", 0) for m in mems)
            self.samples.append((time.perf_counter() - self.start_time, rss, anon, file))
            available = psutil.virtual_memory().available
            if self.stopped_for is None and (anon > self.max_anon or available < self.min_available):
                self.stopped_for = (
                    f"tree's anonymous RSS {anon / GB:.1f} GB > {self.max_anon / GB:.1f} GB"
                    if anon > self.max_anon
                    else f"machine's available memory {available / GB:.1f} GB < {self.min_available / GB:.1f} GB"
                )
                try:
                    os.killpg(self.pid, signal.SIGKILL)  # the child leads its own group (start_new_session)
                except ProcessLookupError:
                    pass
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def summary(self, phases: dict[str, tuple[float, float]] | None = None) -> dict:
        if not self.samples:
            return {}
        at_peak = max(self.samples, key=lambda s: s[1])
        summary = {
            "peak_rss_gb": round(at_peak[1] / GB, 3),
            "anon_at_peak_gb": round(at_peak[2] / GB, 3),
            "file_at_peak_gb": round(at_peak[3] / GB, 3),
            "peak_anon_gb": round(max(s[2] for s in self.samples) / GB, 3),
            "peak_file_gb": round(max(s[3] for s in self.samples) / GB, 3),
            "peak_at_s": round(at_peak[0], 1),
            "samples": len(self.samples),
        }
        if phases:
            summary["peak_phase"] = next(
                (n for n, (a, b) in phases.items() if a <= at_peak[0] <= b), "start-up"
            )
            summary["peak_anon_by_phase_gb"] = {
                n: round(max((s[2] for s in self.samples if a <= s[0] <= b), default=0) / GB, 3)
                for n, (a, b) in phases.items()
            }
        step = max(1, len(self.samples) // 300)  # a timeline of at most ~300 points: each a bin's peak
        summary["timeline"] = [
            [
                round(self.samples[i][0], 1),
                *(round(max(s[k] for s in self.samples[i : i + step]) / GB, 3) for k in (1, 2, 3)),
            ]
            for i in range(0, len(self.samples), step)
        ]
        return summary


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (not idle, not waiting on I/O)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_measured(cmd: list[str], log: Path, env: dict, args) -> dict:
    """Run `cmd` as a child (its own process group), sampling its tree; the wall, CPU, memory and what
    others on the machine did meanwhile."""
    load_before = os.getloadavg()
    busy0, start = busy_cpu_s(), time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = TreeSampler(
            child.pid, args.interval, int(args.max_anon_gb * GB), int(args.min_free_gb * GB)
        )
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own usage (with its waited descendants)
        child.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    wall = time.perf_counter() - start
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, (busy_cpu_s() - busy0 - cpu) / wall)
    return {
        "rc": child.returncode,
        "stopped": sampler.stopped_for,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "max_single_process_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
        "load": {
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "others_cores": round(others, 2),
            "under_load": others > args.clean_cores,
        },
        "_sampler": sampler,
    }
