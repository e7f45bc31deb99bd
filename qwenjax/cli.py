"""The `qwenjax` command: `qwenjax generate ...` (offline generation) and `qwenjax convert SRC DST`."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qwenjax {generate,convert} ...\n  generate  offline generation (python -m qwenjax)\n"
              "  convert   Hugging Face checkpoint -> orbax sharded checkpoint")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        from qwenjax.__main__ import main as run
    elif cmd == "convert":
        from qwenjax.models.convert import main as run
    else:
        raise SystemExit(f"qwenjax: unknown command {cmd!r}; use generate or convert")
    run(rest)


if __name__ == "__main__":
    main()
