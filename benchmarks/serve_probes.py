"""What serve.py measures in the serving process beside the clients' figures: time in garbage collection by
generation, samples of named threads' Python stacks, and the CPU seconds of a thread or a whole process."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from pathlib import Path


class _GCTimer:
    """Seconds spent in garbage collection, by generation, while active (gc.callbacks)."""

    def __init__(self):
        self.seconds, self.count, self._t0, self.active = [0.0] * 3, [0] * 3, None, False
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if not self.active:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            g = info["generation"]
            self.seconds[g] += time.perf_counter() - self._t0
            self.count[g] += 1

    def report(self) -> dict:
        return {"seconds": [round(x, 4) for x in self.seconds], "collections": list(self.count)}


class _StackSampler:
    """Samples where named threads are every `interval` seconds (a poor man's py-spy: frames of sys._current_frames),
    and counts the innermost frames that are in our code or the libraries that matter."""

    def __init__(self, threads: dict[str, int], interval: float = 0.002, depth: int = 4):
        self.threads, self.interval, self.depth = threads, interval, depth
        self.counts = {name: {} for name in threads}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        idents = {t.native_id: t.ident for t in threading.enumerate()}
        want = {name: idents.get(tid) for name, tid in self.threads.items()}
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            for name, ident in want.items():
                f, parts = frames.get(ident), []
                while f is not None and len(parts) < self.depth:
                    code = f.f_code
                    parts.append(f"{Path(code.co_filename).name}:{code.co_name}:{f.f_lineno}")
                    f = f.f_back
                key = " < ".join(parts)
                self.counts[name][key] = self.counts[name].get(key, 0) + 1

    def report(self, top: int = 12) -> dict:
        out = {}
        for name, c in self.counts.items():
            total = sum(c.values()) or 1
            out[name] = [(round(n / total, 3), k) for k, n in sorted(c.items(), key=lambda kv: -kv[1])[:top]]
        return out


def _thread_cpu(tid: int) -> float | None:
    """CPU seconds (user + system) of one thread of this process, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _proc_cpu(pid: int | None) -> float | None:
    """CPU seconds (user + system) of a whole process, every thread included, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None
