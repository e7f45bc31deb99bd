"""LoRA adapters on the server, as vLLM serves them: `--lora-modules name=path ...` at start, each listed in
/v1/models (`parent`: the base model) and chosen by a request's `model`; and, when runtime updating is allowed
(vLLM's env switch VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or --allow-runtime-lora-updating), adapters added and
removed by POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Each adapter gets the process's next lora_int_id (1, 2, ...; an id is never reused, so a name loaded again after
an unload is a new adapter to the engine and its prefix cache). An adapter is read and checked here when it is
added, so a bad one is a start-up error or a 400 naming it, and requests never meet it.
"""

from __future__ import annotations

import itertools
import json
import os

from qwenjax.lora.request import LoRARequest
from server.protocol import APIError

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_IDS = itertools.count(1)  # lora_int_ids of this process: several apps over one engine never share one


def runtime_updating_allowed(flag: bool = False) -> bool:
    """--allow-runtime-lora-updating, or vLLM's environment switch set to true / 1."""
    return flag or os.environ.get(RUNTIME_UPDATING_ENV, "").strip().lower() in ("true", "1")


def parse_lora_module(text: str) -> tuple[str, str]:
    """`name=path`, or vLLM's JSON form {"name": ..., "path": ...} -> (name, path); ValueError otherwise."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-modules {text!r}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or not d.get("name") or not d.get("path"):
            raise ValueError(f"--lora-modules {text!r}: the JSON form needs \"name\" and \"path\"")
        return str(d["name"]), str(d["path"])
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r}: expected name=path (or a JSON object with name and path)")
    return name, path


class ServedLoRAs:
    """The adapters the server offers, by name."""

    def __init__(self, model_config, max_lora_rank: int, base_names: list[str]):
        self.model_config, self.max_lora_rank, self.base_names = model_config, max_lora_rank, base_names
        self.by_name: dict[str, LoRARequest] = {}

    def add(self, name: str, path: str) -> LoRARequest:
        """Reads and checks the adapter; ValueError naming what is wrong (a name in use, a bad adapter)."""
        from qwenjax.lora.peft import load_adapter  # JAX comes with it: not at `python -m server --help`

        if name in self.by_name or name in self.base_names:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        load_adapter(path, lora_name=name, lora_int_id=1, cfg=self.model_config, max_lora_rank=self.max_lora_rank)
        req = self.by_name[name] = LoRARequest(name, next(_IDS), path)
        return req

    def remove(self, name: str) -> None:
        if self.by_name.pop(name, None) is None:
            raise APIError(f"The lora adapter '{name}' cannot be found.", status=404, param="lora_name",
                           code="lora_not_found")

    def model_cards(self, created: int, max_model_len: int) -> list[dict]:
        return [{"id": r.lora_name, "object": "model", "created": created, "owned_by": "qwenjax", "root": r.lora_path,
                 "parent": self.base_names[0], "max_model_len": max_model_len, "permission": []}
                for r in self.by_name.values()]


def request_body(raw: dict, *fields: str) -> list[str]:
    """The string fields of a load / unload body; a 400 naming a missing or non-string one."""
    if not isinstance(raw, dict):
        raise APIError("the request body must be a JSON object", param=None)
    out = []
    for f in fields:
        v = raw.get(f)
        if not isinstance(v, str) or not v:
            raise APIError(f"'{f}' is required: a non-empty string", param=f)
        out.append(v)
    return out


def check_lora_modules(lora_modules, enable_lora: bool) -> None:
    """The --lora-modules flags' form, before the engine starts; ValueError naming a bad one."""
    if lora_modules and not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora (and --max-lora-rank at least the adapters' rank)")
    for text in lora_modules or ():
        parse_lora_module(text)


def served_loras(llm, args, base_names: list[str], lora_modules) -> ServedLoRAs | None:
    """The server's adapters from --lora-modules (None without --enable-lora); ValueError for a bad one."""
    if not getattr(args, "enable_lora", False):
        if lora_modules:
            raise ValueError("--lora-modules needs --enable-lora (and --max-lora-rank at least the adapters' rank)")
        return None
    loras = ServedLoRAs(llm.model_config, args.max_lora_rank, base_names)
    for text in lora_modules or ():
        loras.add(*parse_lora_module(text))
    return loras
