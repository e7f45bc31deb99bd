"""Tool-call parsers, by their `--tool-call-parser` names (vLLM's): each turns a model's text into OpenAI
`tool_calls`, whole (`extract`) or as it streams (`stream`)."""

from __future__ import annotations

import dataclasses

from server.tool_parsers.hermes import HermesStream, extract_tool_calls

TOOL_CALL_PARSERS = ("hermes",)


def check_tool_options(enable_auto_tool_choice: bool, tool_call_parser: str | None) -> None:
    """The server's tool flags (vLLM's rules); ValueError naming what is wrong."""
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"--tool-call-parser {tool_call_parser!r} is not one of {', '.join(TOOL_CALL_PARSERS)}")
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (for Qwen2.5: hermes)")


@dataclasses.dataclass(frozen=True)
class ToolCallParser:
    """The parser one request's choices use. max_calls: calls past it are dropped (parallel_tool_calls false)."""

    name: str = "hermes"
    max_calls: int | None = None

    def __post_init__(self):
        if self.name not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool call parser {self.name!r} is not one of {', '.join(TOOL_CALL_PARSERS)}")

    def stream(self) -> HermesStream:
        return HermesStream(self.max_calls)

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        return extract_tool_calls(text, max_calls=self.max_calls)
