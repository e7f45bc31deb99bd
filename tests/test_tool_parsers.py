"""The hermes tool-call parser (server/tool_parsers/hermes.py) on hand-written Qwen2.5-style outputs, whole and
streamed split at every character; and the grammar of "required" / named tool choices
(server/tool_parsers/hermes_grammar.py), compiled by llguidance with Qwen2.5's tokenizer: a valid call is accepted
token by token, invalid ones are refused."""

from __future__ import annotations

import itertools
import json

import pytest

from qwenjax.core.grammar import GrammarCompiler
from qwenjax.structured_outputs import StructuredOutputsParams
from qwenjax.tokenizer import default_tokenizer_dir, load_tokenizer, write_qwen25_tokenizer
from server.tool_parsers import ToolCallParser, check_tool_options
from server.tool_parsers.hermes import HermesStream, extract_tool_calls
from server.tool_parsers.hermes_grammar import tool_call_grammar

WEATHER = 'Let me check the weather for you.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
          '"unit": "celsius"}}\n</tool_call>'
TWO_CALLS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n<tool_call>\n' \
            '{"name": "get_time", "arguments": {"tz": "Asia/Shanghai", "note": "a \\"quoted\\" </b> {brace}"}}\n' \
            '</tool_call>'
NESTED = '<tool_call>\n{"name": "plan", "arguments": {"steps": [{"do": "a", "n": 1}, {"do": "b", "n": -2.5e3}], ' \
         '"ok": true, "skip": null}}\n</tool_call>'
ARGS_FIRST = '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>'
SCALAR_ARGS = '<tool_call>\n{"name": "count", "arguments": 12}\n</tool_call>\nDone.'
UNCLOSED = 'Calling now <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
NO_CALLS = "Plain text with <tool but no call, and a </tool_call> stray tag."
NOT_JSON = '<tool_call>\nget_weather(city="Paris")\n</tool_call>'
NAME_NOT_STRING = '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call> after'
NO_NAME = 'Hi <tool_call>\n{"arguments": {"a": 1}}\n</tool_call>'

WELL_FORMED = {  # text -> (content, [(name, arguments)])
    WEATHER: ("Let me check the weather for you.", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    TWO_CALLS: (None, [("get_weather", '{"city": "北京"}'),
                       ("get_time", '{"tz": "Asia/Shanghai", "note": "a \\"quoted\\" </b> {brace}"}')]),
    NESTED: (None, [("plan", '{"steps": [{"do": "a", "n": 1}, {"do": "b", "n": -2.5e3}], "ok": true, "skip": null}')]),
    ARGS_FIRST: (None, [("search", '{"q": "x"}')]),
    SCALAR_ARGS: ("Done.", [("count", "12")]),
    UNCLOSED: ("Calling now", [("get_weather", '{"city": "Oslo"}')]),
    NO_CALLS: (NO_CALLS, []),
}
MALFORMED = [NOT_JSON, NAME_NOT_STRING, NO_NAME]


def summary(content, calls):
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def streamed(text: str, cuts: list[int], max_calls=None):
    """Feeds `text` cut at `cuts`; returns (content, [(name, arguments)], deltas) as a client would assemble them."""
    stream, content, calls, deltas = HermesStream(max_calls), "", {}, []
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    for k, piece in enumerate(pieces):
        c, ds = stream.feed(piece, final=k == len(pieces) - 1)
        content += c
        for d in ds:
            assert len([x for x in ds if x["index"] == d["index"]]) == 1  # one delta per call per chunk
            deltas.append(d)
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function" and d["id"].startswith("chatcmpl-tool-")
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]][1] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return (content or None) if calls else content, [tuple(v) for v in calls.values()], deltas


@pytest.mark.parametrize("text", list(WELL_FORMED), ids=range(len(WELL_FORMED)))
def test_whole_text(text):
    content, calls = extract_tool_calls(text)
    assert summary(content, calls) == WELL_FORMED[text]
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
        json.loads(call["function"]["arguments"])  # a JSON text
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("text", list(WELL_FORMED) + MALFORMED, ids=range(len(WELL_FORMED) + len(MALFORMED)))
def test_every_split_streams_the_whole_result(text):
    """Cut at every character (and every pair of characters, and not at all), the deltas add up to the
    non-streaming content and calls."""
    want = summary(*extract_tool_calls(text))
    assert streamed(text, [])[:2] == want
    for i in range(1, len(text)):
        assert streamed(text, [i])[:2] == want, i
    assert streamed(text, list(range(1, len(text))))[:2] == want
    for step in (2, 3, 5):
        assert streamed(text, list(range(step, len(text), step)))[:2] == want


def test_streamed_deltas_follow_vllm():
    """Token by token: the first delta of a call names it with arguments "", the next ones carry argument text."""
    _, _, deltas = streamed(TWO_CALLS, list(range(1, len(TWO_CALLS))))
    first = [d for d in deltas if "id" in d]
    assert [d["function"] for d in first] == [{"name": "get_weather", "arguments": ""},
                                              {"name": "get_time", "arguments": ""}]
    assert [d["index"] for d in first] == [0, 1]
    pieces = [d["function"]["arguments"] for d in deltas if d["index"] == 0 and "id" not in d]
    assert len(pieces) > 5 and "".join(pieces) == '{"city": "北京"}'


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_calls_stay_content(text):
    assert extract_tool_calls(text) == (text, [])


def test_a_call_that_breaks_makes_the_whole_response_content():
    broken = WEATHER + '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": }}\n</tool_call>'
    assert extract_tool_calls(broken) == (broken, [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    want = (None, [("get_weather", '{"city": "北京"}')])
    assert summary(*extract_tool_calls(TWO_CALLS, max_calls=1)) == want
    assert streamed(TWO_CALLS, list(range(1, len(TWO_CALLS))), max_calls=1)[:2] == want
    parser = ToolCallParser("hermes", max_calls=1)
    assert summary(*parser.extract(TWO_CALLS)) == want


def test_tool_flags():
    check_tool_options(True, "hermes")
    check_tool_options(False, None)
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        check_tool_options(True, None)
    with pytest.raises(ValueError, match="not one of hermes"):
        check_tool_options(True, "mistral")


# ---------------------------------------------------------------------------------------------- the grammar
WEATHER_FN = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}
TIME_FN = {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"$ref": "#/$defs/Zone"}}, "required": ["tz"],
    "additionalProperties": False,
    "$defs": {"Zone": {"type": "string", "enum": ["UTC", "Asia/Shanghai"]}}}}  # pydantic-style $defs
NOW_FN = {"name": "now"}  # no parameters: {} only


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    """Qwen2.5's tokenizer, whose `<tool_call>` and `</tool_call>` are single tokens."""
    path = tmp_path_factory.mktemp("qwen25-tokenizer")
    write_qwen25_tokenizer(path)
    tok = load_tokenizer(path)
    return tok, GrammarCompiler(tok, 151936, [151645, 151643])


@pytest.fixture(scope="module")
def qwen2_compiler():
    """Qwen2's tokenizer, which spells the tags in several tokens."""
    tok = load_tokenizer(default_tokenizer_dir())
    return tok, GrammarCompiler(tok, 151936, [151645, 151643])


def accepts(compiler, grammar: str, text: str) -> bool:
    tok, gc = compiler
    matcher = gc.matcher(StructuredOutputsParams(grammar=grammar))
    return all(matcher.consume_token(t) for t in tok.encode(text, add_special_tokens=False)) and \
        matcher.is_accepting()


def call(name, args) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args, ensure_ascii=False)}}}\n</tool_call>'


@pytest.mark.parametrize("special_tags", [True, False])
def test_required_grammar_takes_valid_calls_only(request, special_tags):
    """Qwen2.5's tokenizer gets the tags as its tokens, Qwen2's as text (server/tools.py: has_tool_tags)."""
    compiler = request.getfixturevalue("compiler" if special_tags else "qwen2_compiler")
    fns = [WEATHER_FN, TIME_FN, NOW_FN]
    parallel = tool_call_grammar(fns, parallel=True, special_tags=special_tags)
    single = tool_call_grammar(fns, parallel=False, special_tags=special_tags)
    one = call("get_weather", {"city": "Paris", "unit": "celsius"})
    two = one + "\n" + call("get_time", {"tz": "UTC"}) + "\n" + call("now", {})
    for text in (one, call("get_time", {"tz": "Asia/Shanghai"}), call("now", {})):
        assert accepts(compiler, parallel, text) and accepts(compiler, single, text), text
    assert accepts(compiler, parallel, two) and not accepts(compiler, single, two)
    for bad in (call("get_weather", {"unit": "celsius"}),  # a required property missing
                call("get_weather", {"city": "Paris", "unit": "kelvin"}),  # not in the enum
                call("get_weather", {"city": "x" * 21}),  # past maxLength
                call("get_weather", {"city": "Paris", "extra": 1}),  # additionalProperties false
                call("get_time", {"tz": "Mars"}),  # through the $ref
                call("now", {"a": 1}),  # no parameters
                call("get_wether", {"city": "Paris"}),  # not a tool
                '<tool_call>\n{"arguments": {"tz": "UTC"}, "name": "get_time"}\n</tool_call>',  # name first
                '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>',  # Qwen2.5's spacing
                "Sure! " + one):  # nothing but calls
        assert not accepts(compiler, parallel, bad), bad


def test_tags_are_the_tokenizers_own_tokens(compiler):
    tok, _ = compiler
    grammar = tool_call_grammar([NOW_FN], parallel=False, special_tags=True)
    text = call("now", {})
    assert tok.encode(text)[0] == tok.convert_tokens_to_ids("<tool_call>")
    spelled = [t for part in ("<", "tool", "_call", ">") for t in tok.encode(part)] + tok.encode(text)[1:]
    assert tok.decode(spelled) == text
    _, gc = compiler
    m = gc.matcher(StructuredOutputsParams(grammar=grammar))
    assert not m.consume_token(spelled[0])  # the tag spelled in pieces is refused: the model writes the token
