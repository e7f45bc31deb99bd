"""The `qwenjax` command, vLLM's `vllm` command line:

  qwenjax serve [MODEL] [flags]                  the OpenAI-compatible server (python -m server; vLLM's `vllm serve`)
  qwenjax bench {latency,throughput,serve} ...   the benchmark scripts of the repository's benchmarks/ (`vllm bench`)
  qwenjax generate ...                           offline generation (python -m qwenjax)
  qwenjax convert SRC DST                        Hugging Face checkpoint -> orbax sharded checkpoint
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

BENCHMARKS = ("latency", "throughput", "serve")  # `qwenjax bench NAME` runs benchmarks/NAME.py


def benchmark_script(name: str, root: Path | None = None) -> Path:
    """benchmarks/NAME.py of the repository this qwenjax runs from; SystemExit saying why when there is none."""
    if name not in BENCHMARKS:
        raise SystemExit(f"qwenjax bench: unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    root = Path(__file__).resolve().parents[1] if root is None else root
    script = root / "benchmarks" / f"{name}.py"
    if not script.is_file():
        raise SystemExit(f"qwenjax bench: {script} does not exist. The benchmark scripts are not part of the "
                         f"installed package; they live in the repository's benchmarks/ folder: run qwenjax from a "
                         f"checkout (pip install -e .), or python benchmarks/{name}.py there")
    return script


def bench(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qwenjax bench {" + ",".join(BENCHMARKS) + "} [args]\n  runs benchmarks/NAME.py with the "
              "given args; qwenjax bench NAME --help lists them")
        return
    script = benchmark_script(argv[0])
    # The benchmarks are scripts, not a package (each puts its own folder on sys.path): run the file as
    # `python benchmarks/NAME.py args` would, in this process.
    saved = sys.argv
    sys.argv = [str(script), *argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def serve(argv: list[str]) -> None:
    # server sits above qwenjax in the layering (.importlinter: qwenjax never imports server), so the server's entry
    # point is looked up by name when the command runs, never by an import statement.
    importlib.import_module("server.__main__").main(argv, prog="qwenjax serve")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qwenjax {serve,bench,generate,convert} ...\n" + __doc__.split("\n", 2)[2])
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        run = serve
    elif cmd == "bench":
        run = bench
    elif cmd == "generate":
        from qwenjax.__main__ import main as run
    elif cmd == "convert":
        from qwenjax.models.convert import main as run
    else:
        raise SystemExit(f"qwenjax: unknown command {cmd!r}; use serve, bench, generate or convert")
    run(rest)


if __name__ == "__main__":
    main()
