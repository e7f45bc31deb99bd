"""Hugging Face tokenizers, chat templates and generation defaults, loaded from local directories only.

qwenjax never downloads: every path here must be a directory on this machine (the behaviour of Hugging Face's
``HF_HUB_OFFLINE=1``). The packaged Qwen2 tokenizer (``default_tokenizer_dir()``) serves checkpoints that ship
without tokenizer files; all Qwen2 / Qwen2.5 checkpoints share its byte-level BPE vocabulary, but not always its
chat template or added tokens, so a checkpoint's own files win when present (``resolve_tokenizer_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers

logger = logging.getLogger(__name__)

# Any one of these marks a directory as holding a tokenizer that AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

# Characters that only occur in a Jinja template, never in a file path we would accept.
_JINJA_MARKERS = ("{{", "{%", "{#")


def default_tokenizer_dir() -> str:
    """The packaged Qwen2 tokenizer directory: vocab.json, merges.txt, tokenizer_config.json, generation_config.json."""
    return str(Path(__file__).resolve().parent / "assets" / "qwen2-tokenizer")


def qwen25_tokenizer_dir() -> str:
    """Qwen2.5's tokenizer files over the shared vocabulary: tokenizer_config.json (its chat template, which renders
    `tools` and tool calls in the hermes format), added_tokens.json (`<tool_call>`, `</tool_call>`, ... as single
    tokens) and special_tokens_map.json. Not a tokenizer by itself: `write_qwen25_tokenizer` adds the vocabulary."""
    return str(Path(__file__).resolve().parent / "assets" / "qwen2.5-tokenizer")


def write_qwen25_tokenizer(dst: str | os.PathLike[str]) -> None:
    """Writes a whole Qwen2.5 tokenizer into ``dst``: the packaged Qwen2 vocabulary and merges (the two share them),
    then Qwen2.5's files over them. generation_config.json is not a tokenizer file and is not written."""
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(default_tokenizer_dir()) / name, Path(dst) / name)
    for f in Path(qwen25_tokenizer_dir()).iterdir():
        shutil.copy(f, Path(dst) / f.name)


def has_tokenizer_files(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding at least one file AutoTokenizer loads a tokenizer from."""
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in _TOKENIZER_FILES)


def resolve_tokenizer_dir(model_dir: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None) -> str:
    """Pick the tokenizer directory for a model: an explicit ``tokenizer`` path, else ``model_dir`` when it holds
    tokenizer files, else the packaged Qwen2 tokenizer (logged, since its chat template may differ from the model's).
    """
    if tokenizer is not None:
        return str(tokenizer)
    if has_tokenizer_files(model_dir):
        return str(model_dir)
    logger.warning(
        "%s holds none of %s; using the packaged Qwen2 tokenizer at %s",
        model_dir, ", ".join(_TOKENIZER_FILES), default_tokenizer_dir(),
    )
    return default_tokenizer_dir()


def load_tokenizer(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False
) -> transformers.PreTrainedTokenizerBase:
    """Load the tokenizer in local directory ``path``; raises FileNotFoundError for anything else.

    Loaded tokenizers are cached per (resolved path, trust_remote_code): every caller gets the SAME object, so
    callers must treat it as read-only (no ``add_tokens``, no setting ``chat_template``).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"tokenizer path {str(path)!r} is not a directory; qwenjax loads tokenizers only from local "
            f"directories (no model hub downloads). Pass a directory holding one of {', '.join(_TOKENIZER_FILES)}, "
            f"e.g. the packaged {default_tokenizer_dir()!r}."
        )
    if not has_tokenizer_files(p):
        raise FileNotFoundError(
            f"tokenizer directory {str(path)!r} holds none of {', '.join(_TOKENIZER_FILES)}; pass a directory "
            f"with tokenizer files, e.g. the packaged {default_tokenizer_dir()!r}."
        )
    return _load_tokenizer_cached(str(p.resolve()), trust_remote_code)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(resolved_dir: str, trust_remote_code: bool) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(
        resolved_dir, trust_remote_code=trust_remote_code, local_files_only=True
    )


# ---------------------------------------------------------------------------------------------------------------
# Chat templates


def load_chat_template(chat_template: str | os.PathLike[str]) -> str:
    """Resolve a ``--chat-template`` value: the path of a file holding a Jinja template, or the template itself.

    A string naming an existing file is read; otherwise it must contain Jinja markup (``{{``, ``{%`` or ``{#``),
    else it is taken for a mistyped path and rejected.
    """
    text = os.fspath(chat_template)
    maybe_path = Path(text).expanduser() if len(text) < 4096 and "\n" not in text else None
    if maybe_path is not None and maybe_path.is_file():
        return maybe_path.read_text(encoding="utf-8")
    if any(marker in text for marker in _JINJA_MARKERS):
        return text
    raise ValueError(
        f"chat_template {text[:200]!r} is neither an existing file nor a Jinja template "
        f"(a template contains one of {', '.join(_JINJA_MARKERS)})"
    )


def _content_text(content: Any, index: int) -> str:
    """Message content as the template sees it: a string, or OpenAI-style text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"messages[{index}]['content'] has a part {part!r}; only text parts "
                    f"{{'type': 'text', 'text': str}} are supported (Qwen2 is a text-only model)"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(
        f"messages[{index}]['content'] must be a string or a list of text parts, got {type(content).__name__}"
    )


def _validated_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages is empty; a chat needs at least one {'role': ..., 'content': ...} message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        tool_calls = message.get("tool_calls")
        # An assistant message that calls tools may have no content (OpenAI sends null).
        missing = [key for key in ("role", "content") if key not in message and not (key == "content" and tool_calls)]
        if missing:
            raise ValueError(f"messages[{i}] lacks {' and '.join(repr(k) for k in missing)}: {dict(message)!r}")
        if not isinstance(message["role"], str) or not message["role"]:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {message['role']!r}")
        content = message.get("content")
        # Keep extra keys (name, tool_call_id, ...) for templates that use them.
        checked = {**message, "content": "" if content is None and tool_calls else _content_text(content, i)}
        if tool_calls:
            checked["tool_calls"] = _template_tool_calls(tool_calls, i)
        out.append(checked)
    return out


def _template_tool_calls(tool_calls: Any, index: int) -> list[dict[str, Any]]:
    """An assistant message's OpenAI tool calls as templates take them: each function's `arguments`, a JSON string
    in OpenAI's API, parsed into its object (Qwen2.5's template writes it with `tojson`; vLLM does the same)."""
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
        raise TypeError(f"messages[{index}]['tool_calls'] must be a list of tool calls, got "
                         f"{type(tool_calls).__name__}")
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TypeError(f"messages[{index}]['tool_calls'][{j}] must be {{'type': 'function', 'function': "
                            f"{{'name': str, 'arguments': str}}}}, got {call!r}"[:400])
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"messages[{index}]['tool_calls'][{j}]['function']['arguments'] must be a JSON "
                                 f"text: {e}") from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def apply_chat_template(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | os.PathLike[str] | None = None,
    tokenize: bool = False,
    **kwargs: Any,
) -> str | list[int]:
    """Render ``messages`` into the model's prompt format.

    ``chat_template`` (a template string or a path to a file holding one, as ``--chat-template`` takes) overrides
    the tokenizer's own template. Extra ``kwargs`` (e.g. ``tools``, ``continue_final_message``) reach the
    tokenizer's ``apply_chat_template`` and through it the template.

    Returns the prompt string, or with ``tokenize=True`` its token ids. The ids are ``tokenizer.encode(prompt,
    add_special_tokens=False)``: the template already spells out every special token, so none is added twice.
    """
    checked = _validated_messages(messages)
    template = load_chat_template(chat_template) if chat_template is not None else tokenizer.chat_template
    if template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat template; "
            "pass chat_template= (a Jinja string or a file path) or use a tokenizer whose tokenizer_config.json "
            "has 'chat_template'"
        )
    prompt = tokenizer.apply_chat_template(
        checked, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    if not isinstance(prompt, str):
        raise TypeError(f"chat template rendering returned {type(prompt).__name__}, expected str")
    if tokenize:
        return tokenizer.encode(prompt, add_special_tokens=False)
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# generation_config.json


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """A checkpoint's ``generation_config.json``: stop ids and the sampling values its authors recommend.

    Every sampling field is None when the file does not set it. ``do_sample`` is ignored: the fields below are
    defaults for requests that leave them unset, whatever HF's own ``generate`` would do with them.
    """

    eos_token_ids: tuple[int, ...] = ()  # an int in the file becomes a 1-tuple; order kept
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    max_new_tokens: int | None = None

    def sampling_overrides(self) -> dict[str, float | int]:
        """The sampling fields the file sets, under SamplingParams' names (``max_new_tokens`` -> ``max_tokens``)."""
        named = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
            "max_tokens": self.max_new_tokens,
        }
        return {name: value for name, value in named.items() if value is not None}


GENERATION_CONFIG_FILE = "generation_config.json"

# Fields read as numbers and as integers (same names as in the file); JSON true/false is rejected for both.
_FLOAT_FIELDS = ("temperature", "top_p", "repetition_penalty", "min_p")
_INT_FIELDS = ("top_k", "max_new_tokens")


def load_generation_defaults(model_dir: str | os.PathLike[str]) -> GenerationDefaults:
    """Read ``model_dir/generation_config.json``; a directory without that file gives empty defaults.

    Raises FileNotFoundError when ``model_dir`` is not a directory and ValueError for a malformed file.
    """
    directory = Path(model_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist or is not a directory")
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")

    values: dict[str, Any] = {"eos_token_ids": _eos_ids(raw.get("eos_token_id"), path)}
    for name in _FLOAT_FIELDS:
        value = raw.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}: {name!r} must be a number, got {value!r}")
            values[name] = float(value)
    for name in _INT_FIELDS:
        value = raw.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: {name!r} must be an integer, got {value!r}")
            values[name] = value
    return GenerationDefaults(**values)


def _eos_ids(value: Any, path: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: 'eos_token_id' must be a non-negative int or a list of them, got {value!r}")
    return tuple(ids)
