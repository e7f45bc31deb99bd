"""Result files: the device's name and tag, the commit, the result JSON (its name, contents and writing) and the
tables the scripts print."""

from __future__ import annotations

import datetime
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from repo_paths import REPO

RUN_TAG: str | None = None  # --tag of this process's benchmark (engine_setup.setup_jax sets it; make_result records it)


# ----------------------------------------------------------------------------------------------- device, commit


def device_info() -> dict:
    import jax

    devs = jax.devices()
    kind = devs[0].device_kind
    n = len(devs)
    low = kind.lower()
    m = re.search(r"\b([abhl]\d{2,3}|gh\d{3}|gb\d{3}|b\d{3})\b", low)
    if devs[0].platform == "cpu":
        tag = "cpu"
    elif m:
        tag = m.group(1)
    else:
        tag = re.sub(r"[^a-z0-9]+", "", low)[:16] or devs[0].platform
    if n > 1:
        tag += f"x{n}"
    return {"device": f"{kind} x{n}", "devtag": tag, "platform": devs[0].platform, "count": n}


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty). QWENJAX_COMMIT wins (the GPU machine's copy of the tree has no git)."""
    env = os.environ.get("QWENJAX_COMMIT")
    if env:
        return env, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ----------------------------------------------------------------------------------------------- results


def today() -> str:
    return datetime.date.today().isoformat()


def result_name(benchmark: str, model: str, devtag: str, date: str | None = None) -> str:
    name = f"{benchmark}-{model}-{devtag}-{date or today()}.json"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def make_result(*, benchmark: str, model: str, dev: dict, config: dict, ceilings: dict, metrics: dict,
                peers: dict | None = None) -> dict:
    commit, dirty = git_commit()
    import jax

    from qwenjax.layers.attention import BACKEND_ENV, PREFILL_KERNEL_ENV

    config = dict(config)
    config.setdefault("dtype", "bfloat16")
    config.setdefault("kv_cache_dtype", "auto")
    config.setdefault("attention_backend", os.environ.get(BACKEND_ENV, "auto"))
    config.setdefault("prefill_kernel", os.environ.get(PREFILL_KERNEL_ENV, "auto"))
    if RUN_TAG:
        config.setdefault("tag", RUN_TAG)
    config["env"] = {"jax": jax.__version__, "python": _platform.python_version(), "platform": dev["platform"],
                     "host_cpus": os.cpu_count(), "dirty_tree": dirty, "date": today(),
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     # the kernel switches read from the environment (e.g. QWENJAX_QUANT_SKINNY=lop3)
                     "qwenjax_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("QWENJAX_")
                                     and k != "QWENJAX_COMMIT"},
                     "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    mesh = config.get("engine_args", {}).get("tensor_parallel_size", 1)
    return {"benchmark": benchmark, "model": model, "device": dev["device"], "mesh": mesh,
            "commit": commit, "config": config, "ceilings": ceilings,
            "metrics": {k: _round(v) for k, v in metrics.items()}, "peers": peers or {}}


def _round(v):
    if isinstance(v, float):
        return round(v, 6) if abs(v) < 10 else round(v, 3)
    return v


def write_result(result: dict, *, devtag: str, results_dir: str, out: str | None, name: str | None = None) -> Path:
    cfg = result.get("config", {})
    kv, attn = cfg.get("kv_cache_dtype", "auto"), cfg.get("attention_backend", "auto")
    suffix = ("" if kv == "auto" else f"-kv{kv}") + ("" if attn == "auto" else "-attnref") + \
        ("" if cfg.get("prefill_kernel", "auto") == "auto" else f"-{cfg['prefill_kernel']}") + \
        (f"-{cfg['tag']}" if cfg.get("tag") else "")
    steps = cfg.get("engine_args", {}).get("num_scheduler_steps", 1)
    suffix += f"-steps{steps}" if steps > 1 else ""
    suffix += f"-mesh{result['mesh']}" if result.get("mesh", 1) > 1 else ""
    name = name or result_name(result["benchmark"] + suffix, result["model"], devtag)
    os.makedirs(results_dir, exist_ok=True)
    path = Path(results_dir) / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    if out:
        os.makedirs(out, exist_ok=True)
        if Path(out).resolve() != Path(results_dir).resolve():
            shutil.copy(path, Path(out) / name)
    return path


def print_result_table(title: str, rows: list, result: dict, merged: bool, path) -> None:
    """The workload's rows, then device_busy and the peer ratio when present, then the result file."""
    m = result["metrics"]
    if "device_busy" in m:
        rows.append(("device_busy", m["device_busy"]))
    if merged:
        rows.append(("speedup_vs_transformers", m.get("speedup_vs_transformers")))
    rows.append(("result", str(path)))
    print_table(title, rows)


def paired_rows(metrics: dict, keys, runs: tuple[str, ...]) -> list[tuple[str, str]]:
    """Table rows "key a / b [/ c]" for metrics recorded per run as key_a, key_b, ... (None prints as -)."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [(f"{k} {' / '.join(runs)}", " / ".join(fmt(metrics.get(f"{k}_{r}")) for r in runs)) for k in keys]


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title}")
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
        print(f"  {k.ljust(width)}  {v}")
    sys.stdout.flush()
