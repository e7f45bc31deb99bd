"""Peer figures (transformers on the same config, from a script's `--peer transformers` in a call of its own) and
their merging into result files.

Run `python benchmarks/peers.py merge RESULT.json PEER.json` to fold a peer file into a result file after the fact,
e.g. on a machine without a GPU."""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import time
from pathlib import Path

from model_specs import ModelSpec
from result_files import result_name, write_result

PEER_SUBDIR = "peers"


def peer_name(benchmark: str, model: str, devtag: str, peer: str, date: str | None = None) -> str:
    return result_name(benchmark, model, devtag, date).replace(".json", f".{peer}.json")


def workload_key(config: dict) -> dict:
    """The part of a config that must match for a peer figure to be merged into a result."""
    return {k: config.get(k) for k in ("num_requests", "batch", "prompt_len", "output_len", "prompt_len_range",
                                        "output_len_range", "seed")}


def merge_peer(result: dict, peer: dict) -> dict:
    """Folds a peer file into a result: peers[<peer key>] and metrics['speedup_vs_<peer>'] (larger is better)."""
    pkey, speed_key = peer["config"]["peer_key"], peer["config"]["speedup_key"]
    entry = dict(peer["metrics"])
    entry.update({"ceilings": peer["ceilings"], "device": peer["device"], "commit": peer["commit"],
                  "setup": peer["config"].get("peer_setup", {})})
    result.setdefault("peers", {})[pkey] = entry
    figure = peer["config"]["compare_metric"]  # e.g. output_tok_s; both sides report it
    ours, theirs = result["metrics"].get(figure), peer["metrics"].get(figure)
    if ours and theirs:
        result["metrics"][speed_key] = round(ours / theirs, 4)
    return result


def find_and_merge(result: dict, *, devtag: str, results_dirs: list[str]) -> str | None:
    """Merges the newest matching peer file from results_dirs/peers into `result`; returns its path or None."""
    cands = []
    for d in results_dirs:
        cands += glob.glob(os.path.join(d, PEER_SUBDIR, f"{result['benchmark']}-{result['model']}-{devtag}-*.json"))
    for path in sorted(set(cands), key=os.path.getmtime, reverse=True):
        try:
            peer = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if workload_key(peer["config"]) == workload_key(result["config"]):
            merge_peer(result, peer)
            return path
    return None


def write_peer(peer: dict, *, devtag: str, results_dir: str, out: str | None) -> Path:
    name = peer_name(peer["benchmark"], peer["model"], devtag, peer["config"]["peer"])
    pdir = Path(results_dir) / PEER_SUBDIR
    pdir.mkdir(parents=True, exist_ok=True)
    path = pdir / name
    path.write_text(json.dumps(peer, indent=2) + "\n")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, Path(out) / name)
    # A main result of the same workload written earlier on this machine gets the peer folded in now.
    main = sorted(glob.glob(os.path.join(results_dir, f"{peer['benchmark']}-{peer['model']}-{devtag}-*.json")),
                  key=os.path.getmtime, reverse=True)
    for mpath in main:
        res = json.loads(Path(mpath).read_text())
        if workload_key(res["config"]) == workload_key(peer["config"]):
            merge_peer(res, peer)
            write_result(res, devtag=devtag, results_dir=results_dir, out=out, name=Path(mpath).name)
            print(f"merged the peer into {mpath}")
            break
    return path


def torch_model(spec: ModelSpec):
    """A random-init transformers Qwen2 of the same config, bf16, on CUDA when there is one. EOS is disabled."""
    import torch
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(spec.dir)
    hf_cfg.eos_token_id = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
        except TypeError:  # transformers 4.x spelling
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if dev == "cuda":
        torch.cuda.synchronize()
    return model, dev, time.perf_counter() - t0


def free_torch(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peer_setup_info(model, dev: str, init_s: float) -> dict:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "device": dev,
            "torch_device_name": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "init_seconds": round(init_s, 2)}


def peer_process_setup() -> None:
    """The peer process runs torch first and JAX (for its ceilings) after it: JAX must not take the GPU's memory
    up front, or torch has none."""
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


# ----------------------------------------------------------------------------------------------- CLI: merge


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="benchmark result utilities")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold a peer JSON into a result JSON (in place)")
    m.add_argument("result")
    m.add_argument("peer")
    a = p.parse_args(argv)
    res = json.loads(Path(a.result).read_text())
    peer = json.loads(Path(a.peer).read_text())
    if workload_key(res["config"]) != workload_key(peer["config"]):
        raise SystemExit(f"workloads differ: {workload_key(res['config'])} vs {workload_key(peer['config'])}")
    merge_peer(res, peer)
    Path(a.result).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["metrics"], indent=2))


if __name__ == "__main__":
    main()
