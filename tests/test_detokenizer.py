"""qwenjax.core.detokenizer and qwenjax.core.stop_checker on the packaged Qwen2 tokenizer (CPU)."""

import random

import pytest

from qwenjax.core.detokenizer import IncrementalDetokenizer
from qwenjax.core.stop_checker import StopChecker, StopMatch
from qwenjax.tokenizer import apply_chat_template, default_tokenizer_dir, load_tokenizer

REPLACEMENT = "\ufffd"
IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
LITERAL_REPLACEMENT_TOKEN = 5691  # the bytes EF BF BD: a real U+FFFD character in one token

TEXTS = [
    "我爱北京天安门，今天天气很好！",
    "龘靐齉麤 䲜𠀀𪚥 and rare CJK",
    "Family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, astronaut: 🧑🏽‍🚀, melting: 🫠",
    "𝓗𝓮𝓵𝓵𝓸 ∮ E⋅da = Q, ⅀ Ꙭ ꙮ ᚠᛇᚻ",
    "Mixed: The 量子 computer 🤖 said «bonjour» — naïve café, 日本語のテキスト、한국어 텍스트.",
    "def f(x):\n    return x ** 2  # 平方 😀\n",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_tokenizer_dir())


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return apply_chat_template(tok, [{"role": "user", "content": "写一首诗"}], tokenize=True)


def _stream(tok, prompt, ids, chunks=1, **kwargs):
    """Feed ids in chunks (an int size, or a list of sizes cycled); return (add_tokens deltas, flush delta, detok)."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    sizes = [chunks] if isinstance(chunks, int) else chunks
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        deltas.append(detok.add_tokens(ids[i : i + n]))
        i, k = i + n, k + 1
    return deltas, detok.flush(), detok


def _has_lone_surrogate(s):
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", [1, 2, [3, 1, 2]])
def test_text_token_by_token_never_breaks_characters(tok, prompt_ids, text, chunks):
    ids = tok.encode(text)
    deltas, tail, detok = _stream(tok, prompt_ids, ids, chunks)
    for d in deltas:
        assert REPLACEMENT not in d and not _has_lone_surrogate(d), deltas
    assert tail == ""
    assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=True) == text


def test_texts_really_split_characters_across_tokens(tok):
    # Guards the test above against a tokenizer change that would make it vacuous.
    split = sum(REPLACEMENT in tok.decode([i]) for text in TEXTS for i in tok.encode(text))
    assert split >= 30


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tok, prompt_ids, skip):
    ids = tok.encode("你好 😀") + [IM_END, ENDOFTEXT] + tok.encode("齉") + [IM_START, IM_END]
    deltas, tail, detok = _stream(tok, prompt_ids, ids, skip_special_tokens=skip)
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == detok.output_text == expected
    assert ("<|im_end|>" in expected) is (not skip)
    if skip:
        assert expected == "你好 😀齉"
        # A skipped special token completes nothing: its step yields no text.
        assert deltas[ids.index(IM_END)] == "" and deltas[ids.index(ENDOFTEXT)] == ""


def test_random_token_ids_match_full_decode(tok, prompt_ids):
    rng = random.Random(1234)
    # Tokens that alone end mid-character (byte fragments), so random sequences hit incomplete and invalid UTF-8 often.
    fragments = [i for i in range(0, 151643, 7) if tok.decode([i]).endswith(REPLACEMENT)]
    specials = [IM_START, IM_END, ENDOFTEXT, LITERAL_REPLACEMENT_TOKEN]
    held_at_end = 0
    for trial in range(300):
        n = rng.randint(1, 40)
        ids = [
            rng.choice(fragments) if r < 0.5 else rng.choice(specials) if r < 0.55 else rng.randrange(151643)
            for r in (rng.random() for _ in range(n))
        ]
        skip = trial % 2 == 0
        prompt = prompt_ids if trial % 3 else [rng.choice(fragments)]  # also a prompt that ends mid-character
        deltas, tail, detok = _stream(tok, prompt, ids, rng.choice([1, 1, 2, 5]), skip_special_tokens=skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == detok.output_text == full, (ids, deltas, tail)
        # add_tokens never hands out a trailing U+FFFD; only flush may, when the output really ends in one.
        assert not any(d.endswith(REPLACEMENT) for d in deltas)
        assert all(not _has_lone_surrogate(d) for d in deltas + [tail])
        if tail:
            assert full.endswith(REPLACEMENT)
            held_at_end += 1
    assert held_at_end > 10  # the flush path was exercised


def test_literal_replacement_char_is_emitted_on_flush(tok, prompt_ids):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert detok.add_tokens(tok.encode("ok ")) == "ok "
    assert detok.add_tokens([LITERAL_REPLACEMENT_TOKEN]) == ""  # indistinguishable from an incomplete character
    assert detok.num_pending_tokens == 1
    assert detok.flush() == REPLACEMENT
    assert detok.output_text == "ok " + REPLACEMENT
    assert detok.flush() == ""
    with pytest.raises(RuntimeError, match="after flush"):
        detok.add_tokens([1])


class _CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, tok):
        self._tok, self.sizes = tok, []

    def decode(self, ids, **kwargs):
        self.sizes.append(len(ids))
        return self._tok.decode(ids, **kwargs)


def test_each_step_decodes_a_small_window(tok, prompt_ids):
    counting = _CountingTokenizer(tok)
    ids = tok.encode("".join(TEXTS) * 20)
    assert len(ids) > 1000
    deltas, tail, _ = _stream(counting, prompt_ids, ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert max(counting.sizes) <= 8  # 4 context tokens + at most 3 pending + the new one


def test_empty_add_and_empty_output(tok, prompt_ids):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert detok.add_tokens([]) == ""
    assert detok.flush() == "" and detok.output_text == ""
    assert IncrementalDetokenizer(tok, []).add_tokens(tok.encode("hi")) == "hi"


# ---------------------------------------------------------------------------------------------------------------
# StopChecker


def test_stop_found_across_delta_boundary():
    checker = StopChecker(["STOP"])
    assert checker.check("abc ST", 3) is None
    assert checker.check("abc STOP and more", 11) == StopMatch(stop="STOP", text="abc ", start=4)


def test_include_stop_str_in_output():
    checker = StopChecker(["STOP"], include_stop_str_in_output=True)
    assert checker.check("abc STOP and more", 11) == StopMatch(stop="STOP", text="abc STOP", start=4)


def test_earliest_completed_stop_wins():
    checker = StopChecker(["hello world", "world", "lo"])
    # "lo" completes (ending at offset 6) before "hello world" (starts earlier) and "world"; list order is irrelevant.
    assert checker.check("xhello world", 12) == StopMatch(stop="lo", text="xhel", start=4)
    # Same end offset: the longer (earlier-starting) stop wins.
    both = StopChecker(["lo", "hello"], include_stop_str_in_output=True)
    assert both.check("xhello", 6) == StopMatch(stop="hello", text="xhello", start=1)
    assert StopChecker(["lo", "hello"]).check("xhello", 6).text == "x"


def test_result_independent_of_delta_split():
    checker = StopChecker(["bc", "abcd"])
    text = "xxabcdyy"
    whole = checker.check(text, len(text))
    for i in range(1, len(text) + 1):
        match = checker.check(text[:i], 1)
        if match is not None:
            assert match == whole == StopMatch(stop="bc", text="xxa", start=3)
            break
    else:
        pytest.fail("no stop found char by char")


def test_only_new_region_is_searched():
    checker = StopChecker(["x", "long stop"])
    # "x" in old text (e.g. ignored before min_tokens) is not reported again.
    assert checker.check("x then y", 2) is None
    assert checker.check("x then ylong stop", 9).stop == "long stop"
    assert checker.check("abc", 0) is None
    with pytest.raises(ValueError, match="num_new_chars"):
        checker.check("abc", 4)


def test_stop_validation():
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])
    with pytest.raises(TypeError, match="wrap it in a list"):
        StopChecker("STOP")
    assert StopChecker(["a", "b", "a"]).stops == ("a", "b")
    assert StopChecker([]).check("anything", 3) is None and StopChecker([]).holdback("anything") == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello", 0),
        ("hello <", 1),
        ("hello <|", 2),
        ("hello <|im", 4),
        ("hello <|im_end", 8),  # one char short of the stop string
        ("hello <|im_end|>", 0),  # complete: check() reports it, nothing partial to hold
        ("say Obs", 3),  # "Obs" begins "Observation:"
        ("", 0),
    ],
)
def test_holdback(text, expected):
    checker = StopChecker(["<|im_end|>", "Observation:"])
    assert checker.holdback(text) == expected
    assert StopChecker(["<|im_end|>", "Observation:"], include_stop_str_in_output=True).holdback(text) == 0


def test_streaming_with_holdback_never_leaks_a_stop(tok, prompt_ids):
    stops = ["。", "天气很", "北京天安门"]
    ids = tok.encode(TEXTS[0])
    checker = StopChecker(stops)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    streamed, final = "", None
    for i in ids:
        delta = detok.add_tokens([i])
        match = checker.check(detok.output_text, len(delta))
        if match is not None:
            final = match.text
            break
        visible = detok.output_text[: len(detok.output_text) - checker.holdback(detok.output_text)]
        assert visible.startswith(streamed)
        streamed = visible
    assert final == "我爱"
    assert final.startswith(streamed) and not any(s[:1] in streamed for s in stops)


def test_byte_level_fast_path_is_used_and_agrees_with_the_general_path(tok, prompt_ids):
    from qwenjax.core.detokenizer import byte_table

    pieces, special = byte_table(tok)
    assert len(pieces) == len(tok) and special == {IM_START, IM_END, ENDOFTEXT}
    assert IncrementalDetokenizer(tok, prompt_ids)._pieces is not None
    general = _CountingTokenizer(tok)  # no backend_tokenizer: the windowed tokenizer.decode path
    assert byte_table(general) is None
    rng = random.Random(7)
    fragments = [i for i in range(0, 151643, 11) if tok.decode([i]).endswith(REPLACEMENT)]
    for trial in range(100):
        ids = [rng.choice(fragments) if rng.random() < 0.5 else rng.randrange(151646) for _ in range(rng.randint(1, 30))]
        skip = trial % 2 == 0
        fast = _stream(tok, prompt_ids, ids, 1, skip_special_tokens=skip)
        slow = _stream(general, prompt_ids, ids, 1, skip_special_tokens=skip)
        # The same text (the paths may hold an invalid byte back for different steps), never a trailing U+FFFD.
        assert "".join(fast[0]) + fast[1] == "".join(slow[0]) + slow[1] == tok.decode(ids, skip_special_tokens=skip)
        assert not any(d.endswith(REPLACEMENT) for d in fast[0]), ids
