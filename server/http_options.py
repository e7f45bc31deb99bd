"""The server's HTTP-level flags, vLLM's names: CORS (Starlette's CORSMiddleware) and TLS (passed to uvicorn)."""

from __future__ import annotations

import argparse
import json
import os
import ssl

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware


def _str_list(text: str) -> list[str]:
    """vLLM's form, a JSON list (`'["https://a.example"]'`), or comma-separated values (`https://a.example,*`)."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r} ({e})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
        return value
    return [v.strip() for v in text.split(",") if v.strip()]


def add_http_flags(group) -> None:
    group.add_argument("--allowed-origins", type=_str_list, default=["*"],
                       help="CORS: origins whose browser pages may call the API, a JSON list or comma-separated")
    group.add_argument("--allowed-methods", type=_str_list, default=["*"], help="CORS: allowed HTTP methods")
    group.add_argument("--allowed-headers", type=_str_list, default=["*"], help="CORS: allowed request headers")
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and authorization")
    group.add_argument("--ssl-keyfile", default=None, help="TLS private key file (serve https)")
    group.add_argument("--ssl-certfile", default=None, help="TLS certificate file (serve https)")
    group.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify client certificates with")
    group.add_argument("--ssl-cert-reqs", type=int, default=int(ssl.CERT_NONE),
                       help="client certificates: 0 not asked, 1 optional, 2 required (Python's ssl.CERT_*)")


def check_http_options(ns: argparse.Namespace) -> None:
    """ValueError for TLS flags uvicorn could not use, before the model loads (minutes) rather than after."""
    if ns.ssl_keyfile and not ns.ssl_certfile:
        raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate to serve https with)")
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(ns, flag)
        if path and not os.path.isfile(path):
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    if ns.ssl_cert_reqs not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2, got {ns.ssl_cert_reqs}")


def add_cors(app: FastAPI, ns: argparse.Namespace) -> None:
    """CORS on every route, as vLLM's server always adds it (its defaults allow any origin, method and header). A
    request without an Origin header passes straight through the middleware."""
    app.add_middleware(CORSMiddleware, allow_origins=ns.allowed_origins, allow_methods=ns.allowed_methods,
                       allow_headers=ns.allowed_headers, allow_credentials=ns.allow_credentials)


def uvicorn_options(ns: argparse.Namespace) -> dict:
    """uvicorn.run's keyword arguments."""
    return {"host": ns.host, "port": ns.port, "log_level": ns.uvicorn_log_level, "timeout_keep_alive": 5,
            "ssl_keyfile": ns.ssl_keyfile, "ssl_certfile": ns.ssl_certfile, "ssl_ca_certs": ns.ssl_ca_certs,
            "ssl_cert_reqs": ns.ssl_cert_reqs}
