"""Tool calling on /v1/chat/completions: what a request's `tools`, `tool_choice` and `parallel_tool_calls` make of
its output.

| tool_choice | the output | needs |
| --- | --- | --- |
| "none" (or no tools) | text, never parsed | |
| "auto" (the default with tools) | free text, `<tool_call>` blocks parsed into tool_calls | `--enable-auto-tool-choice --tool-call-parser hermes` |
| "required" | one or more calls to any of the tools (exactly one with parallel_tool_calls false), constrained by a grammar | |
| {"type": "function", "function": {"name": N}} | exactly one call to N, constrained | |

The constrained choices use the hermes format (Qwen2.5's; server/tool_parsers/hermes_grammar.py) whatever parser
the server was started with, so their arguments always parse and validate against the function's parameters. The
tools themselves reach the chat template (`tools=`), which renders them (Qwen2.5's does) for every choice, "none"
included, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pydantic import ValidationError

from qwenjax.structured_outputs import StructuredOutputsParams
from server.protocol import APIError, ChatTool, NamedToolChoice
from server.structured_outputs import request_constraint
from server.tool_parsers import ToolCallParser
from server.tool_parsers.hermes import END, START
from server.tool_parsers.hermes_grammar import tool_call_grammar

AUTO_FLAGS = "--enable-auto-tool-choice --tool-call-parser hermes"


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What the server does with a request's tools: the parser of its output (None: none) and the constraint of
    "required" / named choices (None: free text)."""

    parser: ToolCallParser | None = None
    constraint: StructuredOutputsParams | None = None


def has_tool_tags(tokenizer) -> bool:
    """True when `<tool_call>` and `</tool_call>` are single tokens of the tokenizer (Qwen2.5's added tokens)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return START in added and END in added


def template_tools(tools: list[ChatTool] | None) -> list[dict] | None:
    """The tools as the chat template takes them (OpenAI's objects, unset fields left out)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def parse_tool_choice(value: Any) -> str | NamedToolChoice | None:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValidationError:
            pass
    raise APIError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": {{"name": '
                   f'...}}}}, got {json.dumps(value)[:200]}', param="tool_choice")


def plan_tools(tools: list[ChatTool] | None, tool_choice: Any, parallel_tool_calls: bool | None, *,
               auto_parser: str | None, special_tags: bool) -> ToolPlan:
    """The request's ToolPlan. auto_parser: the server's --tool-call-parser when --enable-auto-tool-choice is set,
    else None. Raises APIError (400) for a choice that cannot be served."""
    tool_choice = parse_tool_choice(tool_choice)
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError("tool_choice needs tools: send the functions the model may call in `tools`, or leave "
                           "tool_choice out", param="tool_choice")
        return ToolPlan()
    choice = "auto" if tool_choice is None else tool_choice
    single = parallel_tool_calls is False
    if choice == "none":
        return ToolPlan()
    if choice == "auto":
        if auto_parser is None:
            implied = " (tools without a tool_choice mean \"auto\")" if tool_choice is None else ""
            raise APIError(f'"auto" tool choice requires the server to be started with {AUTO_FLAGS}{implied}; '
                           f'or send tool_choice "required", "none" or a named function', param="tool_choice")
        return ToolPlan(parser=ToolCallParser(auto_parser, max_calls=1 if single else None))
    functions = [t.function.model_dump(exclude_none=True) for t in tools]
    if choice == "required":
        parallel = not single
    else:  # a NamedToolChoice (pydantic has checked the shape)
        names = [f["name"] for f in functions]
        if choice.function.name not in names:
            raise APIError(f"tool_choice names the function {choice.function.name!r}, which is not in tools (they "
                           f"are: {', '.join(map(repr, names))})", param="tool_choice")
        functions = [f for f in functions if f["name"] == choice.function.name][:1]
        parallel = False
    grammar = tool_call_grammar(functions, parallel=parallel, special_tags=special_tags)
    return ToolPlan(parser=ToolCallParser("hermes", max_calls=None if parallel else 1),
                    constraint=StructuredOutputsParams(grammar=grammar))


def chat_constraints(req, *, auto_parser: str | None,
                     special_tags: bool) -> tuple[ToolPlan, StructuredOutputsParams | None, str | None]:
    """A chat request's ToolPlan, its output constraint and the field that set it (tools, response_format, ...)."""
    so, field = request_constraint(req)
    plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, auto_parser=auto_parser,
                      special_tags=special_tags)
    if plan.constraint is None:
        return plan, so, field
    if so is not None:
        raise APIError(f"tool_choice {'required' if req.tool_choice == 'required' else 'naming a function'} "
                       f"constrains the output to tool calls; it cannot be combined with {field}", param=field)
    return plan, plan.constraint, "tools"
