"""Incremental, UTF-8-safe detokenization of a growing output: text deltas as tokens arrive.

Byte-level BPE (every Qwen2 tokenizer) maps tokens to BYTES, so one character (CJK, emoji) can be split across
tokens; decoding a prefix that ends mid-character yields U+FFFD. We never emit such a tail: each step decodes a
small window of recent tokens and emits only once the window's text no longer ends in U+FFFD.

Fast path (byte-level BPE tokenizers whose decode is the concatenation of the tokens' bytes, Qwen2's): each token
is looked up in a per-tokenizer table of its bytes and fed to an incremental UTF-8 decoder, which holds an incomplete
tail by itself: no tokenizer call per token (about 1 us a token instead of about 10). The general path below serves
every other tokenizer.

Window invariant (general path): ``self._window = context + pending`` where
  * ``context`` (``self._window[:self._read]``) are tokens whose text is already emitted (or prompt tokens), it
    ends on a character boundary and decodes to ``self._context_len`` characters;
  * ``pending`` are tokens whose text is not yet emitted (at most a few: an incomplete UTF-8 tail is <= 3 bytes).
The delta is ``decode(window)[context_len:]``; decoding the context along with the new tokens keeps decoders that
depend on the previous token (e.g. sentencepiece leading spaces) right. After emitting, the emitted tokens become
the new context, trimmed to ``_CONTEXT_TOKENS``, so each step decodes O(new tokens + _CONTEXT_TOKENS) tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import transformers

_REPLACEMENT_CHAR = "\ufffd"

# Tokens kept before the pending ones as decoding context. Byte-level BPE needs none (its decode is context-free
# concatenation of bytes); it only matters for decoders that treat the first token specially.
_CONTEXT_TOKENS = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it encodes."""
    return {c: b for b, c in _bytes_to_unicode().items()}


_TABLES: dict[int, tuple] = {}  # id(backend tokenizer) -> (backend tokenizer, pieces, special ids)


def byte_table(tokenizer) -> tuple[list[bytes], frozenset[int]] | None:
    """(bytes of each token id, the special token ids) for a byte-level BPE tokenizer whose decode is exactly the
    UTF-8 decoding (errors replaced) of its tokens' bytes, special ones as their text; None for any other.

    Ids the vocabulary does not know decode to nothing, as in the tokenizer's own decode.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel" or \
            getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    hit = _TABLES.get(id(backend))
    if hit is not None and hit[0] is backend:
        return hit[1], hit[2]
    decoder = byte_decoder()
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = []
    for i in range(len(tokenizer)):
        token = backend.id_to_token(i)
        if token is None:
            pieces.append(b"")
        elif i in added:
            pieces.append(added[i].content.encode("utf-8"))
        elif all(c in decoder for c in token):
            pieces.append(bytes(decoder[c] for c in token))
        else:
            return None  # not a byte-level vocabulary after all
    special = frozenset(i for i, t in added.items() if t.special)
    _TABLES[id(backend)] = (backend, pieces, special)
    return pieces, special


class IncrementalDetokenizer:
    """Turns one request's output tokens into text, a delta per step, never splitting a UTF-8 character.

    Per step call ``add_tokens(new_ids)`` and append/stream its return value; when the request finishes (stop,
    EOS, length, abort) call ``flush()`` once and treat its return as a last delta: it releases a held-back tail
    that never completed (e.g. invalid bytes from a random token, which then decode to U+FFFD).

    For byte-level BPE tokenizers (Qwen2) the deltas concatenated, flush included, equal
    ``tokenizer.decode(output_ids, skip_special_tokens=..., spaces_between_special_tokens=...)`` exactly, and no
    delta returned by ``add_tokens`` ends in U+FFFD. Skipped special tokens produce no text.

    A held tail can only grow while the output keeps ending in an undecodable byte sequence; for well-formed UTF-8
    that is at most 3 tokens (a UTF-8 character has at most 4 bytes).
    """

    def __init__(
        self,
        tokenizer: transformers.PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._output_text = ""
        self._finished = False
        table = byte_table(tokenizer)
        if table is not None:
            self._pieces, special = table
            self._skip = special if skip_special_tokens else frozenset()
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            self._held = ""          # decoded text ending in U+FFFD, held back until more text follows
            self._held_tokens = 0    # tokens added since text last went out
            return
        self._pieces = None

        # The prompt's last tokens are the first context, unless they end mid-character: then the output would
        # complete that character and the context text would not be a prefix of the window text.
        context = [int(i) for i in prompt_token_ids[-_CONTEXT_TOKENS:]]
        context_text = self._decode(context) if context else ""
        if context_text.endswith(_REPLACEMENT_CHAR):
            context, context_text = [], ""
        self._window: list[int] = context
        self._read = len(context)
        self._context_len = len(context_text)

    @property
    def output_text(self) -> str:
        """All text emitted so far (deltas of ``add_tokens`` and ``flush`` concatenated)."""
        return self._output_text

    @property
    def num_pending_tokens(self) -> int:
        """Output tokens received whose text is held back (an incomplete character so far)."""
        if self._pieces is not None:
            return self._held_tokens
        return len(self._window) - self._read

    @property
    def finished(self) -> bool:
        """True once ``flush()`` was called; no more tokens are accepted."""
        return self._finished

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids`` (output tokens, in order) and return the newly completed text, possibly ''."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add_tokens called after flush(); the request has finished")
        if len(new_ids) == 0:
            return ""
        if self._pieces is not None:
            return self._add_fast(new_ids)
        self._window.extend(int(i) for i in new_ids)
        text = self._decode(self._window)
        # Hold while the window ends in U+FFFD (possibly an incomplete character), or if its text does not yet reach
        # past the context (possible only for decoders whose output shrinks when bytes complete a character).
        if text.endswith(_REPLACEMENT_CHAR) or len(text) < self._context_len:
            return ""
        delta = text[self._context_len :]
        self._output_text += delta
        self._advance()
        return delta

    def flush(self) -> str:
        """Finish: return the held-back text (which may contain U+FFFD); further ``add_tokens`` calls raise."""
        if self._finished:
            return ""
        self._finished = True
        if self._pieces is not None:
            delta, self._held, self._held_tokens = self._held + self._utf8.decode(b"", final=True), "", 0
            self._output_text += delta
            return delta
        if self.num_pending_tokens == 0:
            return ""
        delta = self._decode(self._window)[self._context_len :]
        self._output_text += delta
        return delta

    def _add_fast(self, new_ids: Sequence[int]) -> str:
        pieces, skip, n = self._pieces, self._skip, len(self._pieces)
        data = b"".join(pieces[i] for i in map(int, new_ids) if i not in skip and 0 <= i < n)
        text = self._held + self._utf8.decode(data)  # an incomplete character's bytes stay in the decoder
        self._held_tokens += len(new_ids)
        if text.endswith(_REPLACEMENT_CHAR):  # as the general path: never hand out a trailing U+FFFD before flush
            self._held = text
            return ""
        self._held, self._held_tokens = "", 0 if not self._utf8.getstate()[0] else self._held_tokens
        self._output_text += text
        return text

    def _advance(self) -> None:
        # Everything in the window is emitted and ends on a character boundary: the last tokens become the
        # context. A context that starts mid-character decodes to the same leading U+FFFDs whatever follows it.
        self._window = self._window[-_CONTEXT_TOKENS:]
        self._read = len(self._window)
        self._context_len = len(self._decode(self._window))

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
        )
