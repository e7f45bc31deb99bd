"""Structured outputs offline (issue 26): a tiny random model's output is only valid because of the constraint.

Oracles: the `jsonschema` library for JSON, Python's `re` for regexes, Lark itself is not needed (choices and a
small grammar are checked by hand); async scheduling (default) is checked against synchronous stepping, and free
rows against the same rows without constrained neighbours.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.structured_outputs import GuidedDecodingParams, StructuredOutputsParams
from tests.conftest import SMALL_ENGINE

ENGINE = {**SMALL_ENGINE, "max_model_len": 384, "max_num_seqs": 16}
SEEDS = range(16)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "integer", "minimum": 10000,
                                                                                "maximum": 99999}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "code", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(real_vocab):
    return LLM(str(real_vocab), **ENGINE)


def _all_pages_free(llm):
    blocks = llm.llm_engine.blocks
    return blocks.num_free == blocks.num_pages and not llm.llm_engine.has_unfinished_requests()


def _sampled(so, max_tokens=200, **kw):
    return [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens, structured_outputs=so, **kw) for s in SEEDS]


def test_json_schema_outputs_validate_over_many_seeds(llm):
    outs = llm.generate(["Describe a person:"] * len(SEEDS), _sampled(StructuredOutputsParams(json=PERSON)))
    texts = set()
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        texts.add(c.text)
        assert list(json.loads(c.text))[:2] == ["name", "age"]  # properties come in the schema's order
    assert len(texts) > len(SEEDS) // 2  # sampled, not one forced string
    assert _all_pages_free(llm)


def test_matchers_are_independent_and_come_back_reset(llm):
    """Each sequence holds a matcher of its own (never a deep copy sharing another's lexer cache) and hands it back
    when it ends; a later batch takes those matchers, reset, and its outputs validate again."""
    grammars = llm.llm_engine.constraints.grammars
    so = StructuredOutputsParams(json=PERSON)
    eng = llm.llm_engine
    for s in range(4):
        eng.add_request(f"pool-{s}", "Describe a person:", _sampled(so)[s])
    held = [seq.constraint.matcher for r in eng.requests.values() for seq in r.seqs]
    assert len({id(m) for m in held}) == 4
    while eng.has_unfinished_requests() or eng._in_flight is not None:
        eng.step()
    pooled = {id(m) for m in grammars._idle[("json", so.json)]}
    assert {id(m) for m in held} <= pooled  # every ended sequence's matcher came back
    outs = llm.generate(["Describe a person:"] * 4, _sampled(so)[4:8])
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
    assert _all_pages_free(llm)


def test_regex_choice_and_grammar_outputs_match(llm):
    pattern = r"(cat|dog)-[0-9]{2,4}"
    outs = llm.generate(["x"] * 8, _sampled(StructuredOutputsParams(regex=pattern))[:8])
    assert all(re.fullmatch(pattern, o.outputs[0].text) for o in outs), [o.outputs[0].text for o in outs]
    choices = ["yes", "no", "it depends"]
    outs = llm.generate(["x"] * 8, _sampled(GuidedDecodingParams(choice=choices))[:8])  # vLLM's older name
    assert {o.outputs[0].text for o in outs} <= set(choices)
    lark = 'start: expr\nexpr: NUM | "(" expr OP expr ")"\nOP: "+" | "*"\nNUM: /[1-9]/\n'
    outs = llm.generate(["x"] * 8, _sampled(StructuredOutputsParams(grammar=lark), max_tokens=60)[:8])
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":  # a random model may nest past max_tokens; what ended must be a full expr
            assert _is_expr(c.text), c.text
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 60
    gbnf = 'root ::= "x" [0-9] [0-9]'
    outs = llm.generate(["x"] * 4, _sampled(StructuredOutputsParams(grammar=gbnf))[:4])
    assert all(re.fullmatch(r"x[0-9]{2}", o.outputs[0].text) for o in outs)


def _is_expr(s: str) -> bool:
    while re.search(r"\([1-9][+*][1-9]\)", s):
        s = re.sub(r"\([1-9][+*][1-9]\)", "1", s)
    return re.fullmatch(r"[1-9]", s) is not None


def test_json_object_is_a_json_object(llm):
    outs = llm.generate(["x"] * 8, _sampled(StructuredOutputsParams(json_object=True), max_tokens=120)[:8])
    done = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done, [o.outputs[0].text for o in outs]
    for c in done:
        assert isinstance(json.loads(c.text), dict), c.text


def test_cut_by_max_tokens_keeps_length(llm):
    out = llm.generate(["x"], SamplingParams(temperature=1.0, seed=0, max_tokens=3,
                                             structured_outputs=StructuredOutputsParams(json=PERSON)))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3 and out.text.startswith('{"name"')


def test_free_rows_keep_their_tokens_beside_constrained_rows(llm):
    free = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=24, ignore_eos=True) for i in range(4)]
    alone = llm.generate(["a b c"] * 4, free)
    mixed = llm.generate(["a b c"] * 8, [p for pair in zip(free, _sampled(StructuredOutputsParams(json=PERSON)))
                                          for p in pair])
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[1::2]:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


def test_async_and_synchronous_stepping_agree(llm, real_vocab):
    """Under async scheduling a constrained row's sampler waits for the previous step's token (a late sampler);
    synchronous stepping has no such path. Same seeds, same tokens."""
    params = _sampled(StructuredOutputsParams(json=PERSON))[:6] + [
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, bad_words=["the", "a b"])]
    sync = LLM(str(real_vocab), **ENGINE, async_scheduling=False)
    expect = [o.outputs[0].token_ids for o in sync.generate(["Describe a person:"] * 7, params)]
    assert [o.outputs[0].token_ids for o in llm.generate(["Describe a person:"] * 7, params)] == expect


@pytest.mark.parametrize("so, fragment", [
    (StructuredOutputsParams(json={"type": "nonsense"}), "Invalid type: nonsense"),
    (StructuredOutputsParams(json={"type": "string", "format": "no-such-format"}), "Unknown format"),
    (StructuredOutputsParams(regex="a(b"), "unclosed group"),
    (StructuredOutputsParams(grammar="start: undefined_rule"), "unknown name"),
])
def test_bad_constraints_are_refused_and_lose_nothing(llm, so, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        llm.generate(["x"], SamplingParams(structured_outputs=so))
    assert _all_pages_free(llm)
    ok = llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["ok"])))
    assert ok[0].outputs[0].text == "ok"


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json": "{not json"}, "the text does not parse"),
    ({"json": [1, 2]}, "must be a JSON schema object, got list"),
    ({"choice": "ab"}, "choice must be a non-empty list of strings"),
    ({"choice": []}, "choice must be a non-empty list of strings, got []"),
])
def test_malformed_params_name_the_problem(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        StructuredOutputsParams(**kwargs)


def test_structured_outputs_and_guided_decoding_are_one_field():
    so = StructuredOutputsParams(regex="a+")
    assert SamplingParams(guided_decoding=so).structured_outputs == so
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == so
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(guided_decoding=so, structured_outputs=so)


def test_abort_mid_generation_returns_every_page(llm):
    """Constrained rows run a late sampler (the model call dispatched, the sampler waiting for the previous step's
    tokens); aborting there, and starting again, loses nothing."""
    eng = llm.llm_engine
    so = StructuredOutputsParams(json=PERSON)
    for i in range(3):
        eng.add_request(f"abort-{i}", "Describe a person:", SamplingParams(temperature=1.0, seed=i, max_tokens=200,
                                                                          structured_outputs=so))
    late = eng.stats.late_samplers
    for _ in range(6):
        eng.step()
    assert eng.stats.late_samplers > late  # the path under test is in use
    eng.abort_request([f"abort-{i}" for i in range(3)])
    while eng.has_unfinished_requests() or eng._in_flight is not None:
        eng.step()
    assert _all_pages_free(llm)
    out = llm.generate(["x"], SamplingParams(temperature=1.0, seed=5, max_tokens=200, structured_outputs=so))[0]
    jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


def test_a_constraint_that_cannot_continue_fails_its_request_alone(llm):
    """choice ["ok"] with min_tokens 4: after "ok" only EOS may follow, and min_tokens bans it, so no token is allowed
    (the sampler draws some token anyway). The request fails with an error saying so, never returning text outside
    its constraint; a request beside it completes; pages come back."""
    eng = llm.llm_engine
    bad = SamplingParams(temperature=1.0, seed=1, max_tokens=8, min_tokens=4,
                         structured_outputs=StructuredOutputsParams(choice=["ok"]))
    good = SamplingParams(temperature=1.0, seed=2, max_tokens=8, ignore_eos=True)
    eng.add_request("cannot-continue", "x", bad)
    eng.add_request("beside-it", "x", good)
    done = {}
    while eng.has_unfinished_requests() or eng._in_flight is not None:
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    failed = dict(eng.take_failed())
    assert "only EOS may follow, but token" in str(failed["cannot-continue"])
    assert "cannot-continue" not in done or done["cannot-continue"].outputs[0].finish_reason == "error"
    assert len(done["beside-it"].outputs[0].token_ids) == 8
    assert _all_pages_free(llm)
