"""The hermes tool-call format (Qwen2.5, Hermes 2 Pro; vLLM's `--tool-call-parser hermes`): calls are JSON objects
between tags, one block per call,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

turned into OpenAI `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments"}}`, the arguments as
a JSON string).

`HermesStream` parses the text as it streams: a call's first delta carries its index, id, type, name and the
arguments known so far (`""` when streamed token by token); later deltas carry the next pieces of the arguments
text. `extract_tool_calls` parses a whole text (vLLM's non-streaming rule: if any block is not a JSON object with a
string "name" and an "arguments", the whole text is content and nothing is a call); for any text that passes it, the
stream's deltas, concatenated, give the same content, names and arguments, however the text is split.

Decisions where vLLM leaves room:
- arguments are the model's own text of the "arguments" value (valid JSON, as the block parsed), not re-serialized,
  so that what streams is what the whole response says;
- content is the text outside the blocks, without the whitespace that separates it from a block; None when calls
  were made and no other text remains;
- a block that stops being a call before its name is complete (not an object, a name that is not a string) streams
  as content. One that breaks after its name went out stays a call (a stream cannot take a delta back), while the
  whole-text rule makes the response content: the two only differ on malformed output.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END) + "|" + re.escape(START) + r"(.*)", re.DOTALL)
_WS = " \t\n\r"


def make_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


def _held(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Block:
    """Scans one block's JSON object as it grows: the "name" string once complete, the "arguments" value's text.

    Only the top level of the object is tracked (key, colon, value, comma); nested values are skipped by depth and
    string state. `failed` is set at the first character that cannot belong to `{"key": value, ...}`."""

    def __init__(self):
        self.raw = ""
        self.pos = 0
        self.state = "open"  # open, key_or_end, key, colon, value, in_value, comma_or_end, done
        self.failed = False
        self.key = None
        self.start = 0  # of the current key or value in raw
        self.depth = 0  # nesting inside the current value
        self.in_string = self.escape = False
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None

    def feed(self, text: str) -> None:
        self.raw += text
        while self.pos < len(self.raw) and not self.failed:
            self._step(self.raw[self.pos])
            self.pos += 1

    def args_text(self) -> str:
        """The arguments' text known so far (trailing whitespace held back until the value goes on)."""
        if self.args_start is None:
            return ""
        if self.args_end is not None:
            return self.raw[self.args_start:self.args_end]
        return self.raw[self.args_start:self.pos].rstrip(_WS)

    def _string_char(self, c: str) -> bool:
        """Advances string state by c; True when c closed the string."""
        if self.escape:
            self.escape = False
        elif c == "\\":
            self.escape = True
        elif c == '"':
            self.in_string = False
            return True
        return False

    def _step(self, c: str) -> None:
        s = self.state
        if s == "in_value":
            self._value_char(c)
        elif s == "key":
            if self._string_char(c):
                self.key = _loads(self.raw[self.start:self.pos + 1])
                self.state = "colon"
                self.failed = self.key is None
        elif c in _WS:
            return
        elif s == "open":
            self._expect(c == "{", "key_or_end")
        elif s == "key_or_end" and c == '"':
            self.state, self.start, self.in_string = "key", self.pos, True
        elif s in ("key_or_end", "comma_or_end") and c == "}":
            self.state = "done"
        elif s == "colon":
            self._expect(c == ":", "value")
        elif s == "comma_or_end":
            self._expect(c == ",", "key_or_end")
        elif s == "value":
            self.state, self.start, self.depth = "in_value", self.pos, 0
            if self.key == "arguments":
                self.args_start = self.pos
            self._value_char(c)
        else:  # key_or_end without a key, or anything after the object
            self.failed = True

    def _expect(self, ok: bool, then: str) -> None:
        if ok:
            self.state = then
        else:
            self.failed = True

    def _value_char(self, c: str) -> None:
        if self.in_string:
            if self._string_char(c) and self.depth == 0:
                self._end_value(self.pos + 1)
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]" and self.depth > 0:
            self.depth -= 1
            if self.depth == 0:
                self._end_value(self.pos + 1)
        elif self.depth == 0 and (c in ",}" or c in _WS) and self.pos > self.start:
            self._end_value(self.pos)  # a number, true, false or null ended
            self._step(c)
        elif self.depth == 0 and c in ",}":
            self.failed = True  # no value at all

    def _end_value(self, end: int) -> None:
        self.state = "comma_or_end"
        if self.key == "arguments":
            self.args_end = end
        elif self.key == "name":
            value = self.raw[self.start:end]
            self.name = _loads(value) if value.startswith('"') else None
            self.failed = self.name is None  # a name that is not a (valid) string


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclasses.dataclass
class _Call:
    index: int
    id: str
    name: str
    sent: int = 0  # characters of its arguments sent


class HermesStream:
    """One choice's streamed text -> (content delta, tool-call deltas), fed the new text of each chunk.

    max_calls: blocks past this many calls are dropped (parallel_tool_calls false keeps the first)."""

    def __init__(self, max_calls: int | None = None):
        self.max_calls = max_calls
        self.calls: list[_Call] = []
        self._buf = ""  # text not yet decided (a tail that may become a tag)
        self._block: _Block | None = None
        self._call: _Call | None = None
        self._dropping = False  # the current block is a call past max_calls
        self._pending_ws = ""  # whitespace at the end of the content so far: dropped if a call follows
        self._block_ws = ""  # the pending whitespace when the current block began
        self._after_call = False  # the whitespace that follows a call is dropped

    # ---- public
    def feed(self, text: str, *, final: bool = False) -> tuple[str, list[dict]]:
        """(content, tool-call deltas) that `text`, the choice's next text, decides; with `final` (the choice has
        ended) also what was held back."""
        out: list[str] = []
        deltas: list[dict] = []
        self._feed(text, out, deltas)
        if final:
            self._finish(out, deltas)
        return "".join(out), _merged(deltas)

    def _feed(self, text: str, out: list[str], deltas: list[dict]) -> None:
        self._buf += text
        while self._buf:
            if self._block is None:
                i = self._buf.find(START)
                if i < 0:
                    keep = _held(self._buf, START)
                    self._text(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return
                self._text(self._buf[:i], out)
                self._buf = self._buf[i + len(START):]
                self._open()
                continue
            j = self._buf.find(END)
            keep = 0 if j >= 0 else _held(self._buf, END)
            body = self._buf[:j] if j >= 0 else self._buf[:len(self._buf) - keep]
            self._buf = self._buf[j + len(END):] if j >= 0 else self._buf[len(self._buf) - keep:]
            rest = self._advance(body, out, deltas)
            if rest is not None:  # the block turned out not to be a call: the remaining text is plain text
                self._buf = rest + (END if j >= 0 else "") + self._buf
            elif j >= 0:
                self._close(out, closed=True)
            else:
                return

    def _finish(self, out: list[str], deltas: list[dict]) -> None:
        while self._block is not None:
            body, self._buf = self._buf, ""
            rest = self._advance(body, out, deltas)
            if rest is None:
                self._close(out, closed=False)
            else:  # plain text again, which may open another block
                self._feed(rest, out, deltas)
        self._text(self._buf, out)
        self._buf = ""
        out.append(self._pending_ws)
        self._pending_ws = ""

    # ---- text outside blocks
    def _text(self, text: str, out: list[str]) -> None:
        if self._after_call:
            text = text.lstrip(_WS)
            if not text:
                return
            self._after_call = False
        text = self._pending_ws + text
        core = text.rstrip(_WS)
        if core:
            out.append(core)
        self._pending_ws = text[len(core):]

    # ---- blocks
    def _open(self) -> None:
        self._block = _Block()
        self._block_ws, self._pending_ws = self._pending_ws, ""
        self._call, self._dropping = None, False

    def _advance(self, body: str, out: list[str], deltas: list[dict]) -> str | None:
        """Feeds a block's text on; returns the block's text as plain text if it stopped being a call before its
        name was complete."""
        b = self._block
        b.feed(body)
        if self._call is None and not self._dropping:
            # The scan stops at a failure, so a name it holds was complete before anything went wrong: whatever
            # the split of the text, the call starts at the same character.
            if b.name is not None:
                if self.max_calls is not None and len(self.calls) >= self.max_calls:
                    self._dropping = True
                else:
                    self._call = _Call(len(self.calls), make_tool_call_id(), b.name)
                    self.calls.append(self._call)
                    deltas.append({"index": self._call.index, "id": self._call.id, "type": "function",
                                   "function": {"name": b.name, "arguments": ""}})
            elif b.failed:
                return self._abandon(out)
        if self._call is not None:
            args = b.args_text()
            if len(args) > self._call.sent:
                deltas.append({"index": self._call.index, "function": {"arguments": args[self._call.sent:]}})
                self._call.sent = len(args)
        return None

    def _abandon(self, out: list[str]) -> str:
        """The block is not a call: its opening tag and text go back to being content."""
        raw = self._block.raw
        self._block = None
        self._pending_ws = self._block_ws
        self._text(START, out)
        return raw

    def _close(self, out: list[str], *, closed: bool) -> None:
        if self._call is None and not self._dropping:  # the block ended before its name: content after all
            raw = self._abandon(out)
            self._text(raw + (END if closed else ""), out)
            return
        self._block, self._call, self._dropping = None, None, False
        self._after_call = True


def _merged(deltas: list[dict]) -> list[dict]:
    """One delta per call: a call's pieces of one chunk joined (its first delta keeps id, type and name)."""
    merged: list[dict] = []
    for d in deltas:
        if merged and merged[-1]["index"] == d["index"]:
            fn = merged[-1]["function"]
            fn["arguments"] = fn.get("arguments", "") + d["function"]["arguments"]
        else:
            merged.append(d)
    return merged


def _is_call(block: str) -> bool:
    try:
        obj = json.loads(block)
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj


def extract_tool_calls(text: str, *, max_calls: int | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole response. Content is None when calls were made and nothing else was said."""
    if START not in text:
        return text, []
    if not all(_is_call(a or b) for a, b in _BLOCK.findall(text)):
        return text, []
    content, deltas = HermesStream(max_calls).feed(text, final=True)
    calls = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function",
                                             "function": {"name": d["function"].get("name"), "arguments": ""}})
        call["function"]["arguments"] += d["function"].get("arguments", "")
    return (content or None) if calls else content, list(calls.values())
