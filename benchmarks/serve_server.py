"""serve.py's server side: the app under uvicorn on a loopback socket in a thread of this process, the versions of
what serves it, and the frontend's GC threshold (python -m server's unless --frontend-gc-threshold)."""

from __future__ import annotations

import socket
import threading
import time


class _Uvicorn:
    def __init__(self, app, http: str = "auto"):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", backlog=4096, timeout_keep_alive=60,
                                                   http=http))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


def server_gc_threshold() -> int:
    from server.__main__ import GC_THRESHOLD0

    return GC_THRESHOLD0


def gc_threshold(args) -> int:
    return args.frontend_gc_threshold or server_gc_threshold()



def _server_info(srv) -> dict:
    import importlib.metadata as md

    cfg = srv.server.config
    info = {"http": type(cfg.http_protocol_class).__name__ if not isinstance(cfg.http_protocol_class, type)
            else cfg.http_protocol_class.__name__, "loop": cfg.loop, "stream_interval": None}
    for pkg in ("uvicorn", "fastapi", "starlette", "uvloop", "httptools", "aiohttp", "httpx"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info
