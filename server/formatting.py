"""RequestOutputs -> OpenAI response bodies and stream chunks (chat and completions), with logprobs and usage.

Streaming invariant (per choice): the text sent so far is always a prefix of the choice's final text. The engine's
text never ends in a broken UTF-8 character (its detokenizer holds incomplete bytes back); on top of that a choice
with stop strings holds back the longest tail that could still become a stop string (StopChecker.holdback), since the
engine cuts a matched stop string out of the final text.
"""

from __future__ import annotations

import json
import time
from typing import Any

from qwenjax.core.detokenizer import byte_decoder
from qwenjax.core.stop_checker import StopChecker
from qwenjax.outputs import CompletionOutput, RequestOutput

MIN_LOGPROB = -9999.0  # -inf is not JSON; OpenAI clients get this instead
_JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode


class TokenText:
    """Token id -> its text and its exact bytes, cached (for logprobs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = byte_decoder()
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, tid: int) -> str:
        s = self._text.get(tid)
        if s is None:
            s = self._text[tid] = self.tokenizer.decode([tid])
        return s

    def bytes(self, tid: int) -> list[int]:
        b = self._bytes.get(tid)
        if b is None:
            piece = self.tokenizer.convert_ids_to_tokens(tid) or ""
            if all(c in self._decoder for c in piece):
                b = [self._decoder[c] for c in piece]
            else:  # an added / special token: its text is its bytes
                b = list(piece.encode("utf-8"))
            self._bytes[tid] = b
        return b


class _Progress:
    """What one choice has streamed: text length, tokens, text offset (completions logprobs)."""

    def __init__(self, params):
        self.checker = StopChecker(params.stop, params.include_stop_str_in_output) if params.stop else None
        self.text_len = 0
        self.tokens = 0
        self.offset = 0
        self.done = False
        self.started = False

    def advance(self, comp: CompletionOutput) -> tuple[str, int, int]:
        """(new text to send, first new token index, end token index)."""
        text = comp.text
        end = len(text)
        if comp.finish_reason is None and self.checker is not None:
            end -= self.checker.holdback(text)
        end = max(end, self.text_len)
        delta = text[self.text_len:end]
        self.text_len = end
        a, self.tokens = self.tokens, len(comp.token_ids)
        if comp.finish_reason is not None:
            self.done = True
        return delta, a, self.tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Formatter:
    """Shared state of one response: id, model, choices per prompt, logprob settings, token counts."""

    object_name = ""
    chunk_object = ""

    def __init__(self, *, request_id: str, model: str, params, prompt_lens: list[int], token_text: TokenText,
                 num_logprobs: int | None, include_usage: bool = False, continuous_usage: bool = False):
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.params, self.n = params, params.n
        self.prompt_lens = prompt_lens
        self.tt = token_text
        self.num_logprobs = num_logprobs
        self.include_usage, self.continuous_usage = include_usage, continuous_usage
        self.progress = [[_Progress(params) for _ in range(self.n)] for _ in prompt_lens]
        self.completion_tokens = [[0] * self.n for _ in prompt_lens]

    def usage(self) -> dict:
        return usage(sum(self.prompt_lens), sum(map(sum, self.completion_tokens)))

    def chunk(self, choices: list[dict]) -> dict:
        body = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = self.usage() if self.continuous_usage else None
        return body

    def stream_chunks(self, i: int, out: RequestOutput) -> list[dict]:
        """Chunks for prompt i's newest cumulative output."""
        return [self.chunk([choice]) for choice in self._stream_choices(i, out)]

    def stream_sse(self, i: int, out: RequestOutput) -> list[bytes]:
        """stream_chunks as SSE events; the fixed part of each chunk is encoded once per response (hot path)."""
        if not hasattr(self, "_sse_head"):
            self._sse_head = (f'data: {{"id":{_JSON(self.id)},"object":{_JSON(self.chunk_object)},'
                              f'"created":{self.created},"model":{_JSON(self.model)},"choices":[')
        tail = "]}\n\n"
        if self.include_usage:
            tail = "],\"usage\":" + (_JSON(self.usage()) if self.continuous_usage else "null") + "}\n\n"
        return [(self._sse_head + _JSON(choice) + tail).encode("utf-8") for choice in self._stream_choices(i, out)]

    def _stream_choices(self, i: int, out: RequestOutput) -> list[dict]:
        choices = []
        for comp in out.outputs:
            p = self.progress[i][comp.index]
            if p.done:
                continue
            self.completion_tokens[i][comp.index] = len(comp.token_ids)
            first = not p.started
            p.started = True
            delta, a, b = p.advance(comp)
            reason = comp.finish_reason
            lp = self.num_logprobs is not None and b > a
            if delta or reason is not None or lp or first:
                choice = self.stream_choice(i * self.n + comp.index, i, comp, delta, a, b, first)
                if choice is not None:
                    choices.append(choice)
        return choices

    def final_chunks(self) -> list[dict]:
        if not self.include_usage:
            return []
        body = self.chunk([])
        body["usage"] = self.usage()
        return [body]

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(finals):
            for comp in out.outputs:
                self.completion_tokens[i][comp.index] = len(comp.token_ids)
                choices.append(self.full_choice(i * self.n + comp.index, i, comp))
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    # ---- logprobs
    def _entry(self, comp: CompletionOutput, j: int):
        tid = comp.token_ids[j]
        entry = comp.logprobs[j] if comp.logprobs is not None and j < len(comp.logprobs) else {}
        chosen = entry.get(tid)
        lp = MIN_LOGPROB if chosen is None else max(chosen.logprob, MIN_LOGPROB)
        tops = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: self.num_logprobs or 0]
        return tid, lp, [(t, max(l.logprob, MIN_LOGPROB)) for t, l in tops]

    def stream_choice(self, index, i, comp, delta, a, b, first) -> dict | None:
        raise NotImplementedError

    def full_choice(self, index, i, comp) -> dict:
        raise NotImplementedError


class ChatFormatter(Formatter):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def logprobs(self, comp: CompletionOutput, a: int, b: int) -> dict | None:
        if self.num_logprobs is None:
            return None
        content = []
        for j in range(a, b):
            tid, lp, tops = self._entry(comp, j)
            content.append({"token": self.tt.text(tid), "logprob": lp, "bytes": self.tt.bytes(tid),
                            "top_logprobs": [{"token": self.tt.text(t), "logprob": v, "bytes": self.tt.bytes(t)}
                                             for t, v in tops]})
        return {"content": content}

    def __init__(self, *, tool_parser=None, **kwargs):
        """tool_parser: a server.tool_parsers.ToolCallParser whose calls come out as tool_calls (None: plain text)."""
        super().__init__(**kwargs)
        self.tool_parser = tool_parser
        self._tool_streams: dict[int, Any] = {}

    def stream_choice(self, index, i, comp, delta, a, b, first):
        d: dict[str, Any] = {"role": "assistant"} if first else {}
        reason, calls = comp.finish_reason, []
        if self.tool_parser is not None:
            stream = self._tool_streams.get(index) or self._tool_streams.setdefault(index, self.tool_parser.stream())
            delta, calls = stream.feed(delta, final=reason is not None)
            reason = _with_tool_calls(reason, stream.calls)
        if delta or first:
            d["content"] = delta
        if calls:
            d["tool_calls"] = calls
        lp = self.logprobs(comp, a, b)
        if not d and reason is None and lp is None:
            return None  # the tool parser holds this text back
        return {"index": index, "delta": d, "logprobs": lp, "finish_reason": reason, "stop_reason": comp.stop_reason}

    def full_choice(self, index, i, comp):
        message: dict[str, Any] = {"role": "assistant", "content": comp.text}
        reason = comp.finish_reason
        if self.tool_parser is not None:
            message["content"], calls = self.tool_parser.extract(comp.text)
            if calls:
                message["tool_calls"] = calls
            reason = _with_tool_calls(reason, calls)
        return {"index": index, "message": message, "logprobs": self.logprobs(comp, 0, len(comp.token_ids)),
                "finish_reason": reason, "stop_reason": comp.stop_reason}


def _with_tool_calls(reason: str | None, calls) -> str | None:
    """A choice that made calls and then ended on its own finishes with "tool_calls" (OpenAI's); one cut by
    max_tokens keeps "length"."""
    return "tool_calls" if calls and reason == "stop" else reason


class CompletionFormatter(Formatter):
    object_name = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *, echo_texts: list[str] | None, **kwargs):
        super().__init__(**kwargs)
        self.echo_texts = echo_texts

    def logprobs(self, comp: CompletionOutput, a: int, b: int, offset: int) -> tuple[dict | None, int]:
        if self.num_logprobs is None:
            return None, offset
        tokens, values, tops, offsets = [], [], [], []
        for j in range(a, b):
            tid, lp, top = self._entry(comp, j)
            text = self.tt.text(tid)
            tokens.append(text)
            values.append(lp)
            tops.append({self.tt.text(t): v for t, v in top} if self.num_logprobs else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset

    def stream_choice(self, index, i, comp, delta, a, b, first):
        p = self.progress[i][comp.index]
        if first and self.echo_texts is not None:
            delta = self.echo_texts[i] + delta
            p.offset = len(self.echo_texts[i])
        lp, p.offset = self.logprobs(comp, a, b, p.offset)
        if not delta and comp.finish_reason is None and lp is None:
            return None  # nothing to say yet (an empty first chunk is only useful for chat's role)
        return {"index": index, "text": delta, "logprobs": lp, "finish_reason": comp.finish_reason,
                "stop_reason": comp.stop_reason}

    def full_choice(self, index, i, comp):
        prefix = self.echo_texts[i] if self.echo_texts is not None else ""
        lp, _ = self.logprobs(comp, 0, len(comp.token_ids), len(prefix))
        return {"index": index, "text": prefix + comp.text, "logprobs": lp, "finish_reason": comp.finish_reason,
                "stop_reason": comp.stop_reason}
