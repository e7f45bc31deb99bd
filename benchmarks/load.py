"""load: start-up time of the two weight paths, a Hugging Face safetensors checkpoint vs `qwenjax convert`'s orbax
checkpoint, for one model shape with random weights (written here first).

  python benchmarks/load.py --model qwen2-0.5b-instruct [--mesh N] [--dtype bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_specs  # noqa: E402
import result_files  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2-0.5b-instruct")
    ap.add_argument("--mesh", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from qwenjax.config import ModelConfig
    from qwenjax.models.convert import convert, restore_params
    from qwenjax.models.default_model import write_random_checkpoint
    from qwenjax.models.loader import load_params
    from qwenjax.models.sharding import make_mesh

    spec = model_specs.resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="qwenjax-load-"))
    try:
        src, dst = tmp / "hf", tmp / "orbax"
        src.mkdir()
        t0 = time.perf_counter()
        write_random_checkpoint(src, {**spec.config, "torch_dtype": "float32"}, seed=0)
        write_s = time.perf_counter() - t0
        cfg = ModelConfig.from_file(str(src / "config.json"))
        convert_s = convert(src, dst, dtype=args.dtype)
        mesh = make_mesh(args.mesh)
        dtype = jnp.dtype(args.dtype)
        times = {"safetensors": [], "orbax": []}
        for _ in range(args.repeats):
            for name, fn in (("safetensors", lambda: load_params(src, cfg, dtype, mesh=mesh)),
                             ("orbax", lambda: restore_params(dst, cfg, dtype, mesh=mesh))):
                t0 = time.perf_counter()
                _, params = fn()
                jax.block_until_ready(params)
                times[name].append(time.perf_counter() - t0)
                del params
        ckpt_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = result_files.device_info()
    metrics = {"safetensors_s": min(times["safetensors"]), "orbax_s": min(times["orbax"]),
               "speedup_vs_safetensors": min(times["safetensors"]) / min(times["orbax"]), "convert_s": convert_s}
    result = {"benchmark": "load", "model": args.model, "device": dev["device"], "mesh": args.mesh,
              "commit": result_files.git_commit()[0], "config": {"dtype": args.dtype, "checkpoint_gb_float32": ckpt_gb,
                                                        "write_random_checkpoint_s": write_s, "repeats": args.repeats,
                                                        "all_times_s": times},
              "ceilings": {}, "metrics": metrics, "peers": {}}
    print(json.dumps(metrics, indent=2))
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    print("result", path)
    return result


if __name__ == "__main__":
    main()
