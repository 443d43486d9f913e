"""Structured output (runtime/constrain.py): what the mask lets through always parses and
validates, with real tokenizers (SmolLM2's 49k vocabulary, Gemma 3's 262k) and the real
model; tool calls in the generic format round-trip; bad requests are InvalidArgumentError."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from flashlm.errors import FlashLMError, InvalidArgumentError
from flashlm.formats.modelfile import GGUFModelFile
from flashlm.runtime import constrain
from flashlm.runtime.constrain import (
    json_schema_grammar,
    parse_tool_reply,
    response_format_grammar,
    tools_grammar,
    tools_system_prompt,
)
from flashlm.runtime.gguf_tokenizer import GGUFTokenizer
from flashlm.runtime.tokenizer import HFTokenizer

PERSON = {  # nested, every string and array bounded so random walks finish
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "score": {"type": "number"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"email": {"type": "string", "maxLength": 16},
                                 "level": {"type": "integer", "minimum": 1, "maximum": 5}},
                  "required": ["level"], "additionalProperties": False},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
    },
    "required": ["id", "name", "status", "owner"],
    "additionalProperties": False,
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object",
                   "properties": {"query": {"type": "string", "maxLength": 12},
                                  "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["query", "limit"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]


def _gguf_tokenizer(path):
    f = GGUFModelFile(path)
    return GGUFTokenizer(path, f.metadata, f.arch, file=f)


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    tok = _gguf_tokenizer(smollm2_path)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def closing_bias(smol_tok):
    return _closing_bias(smol_tok)


def _closing_bias(tok):
    """+5 on tokens with a quote or a closing bracket: pushes a random walk through an
    open-ended schema (any object: unbounded strings) to an end, as a model would."""
    bias = np.zeros(tok.n_vocab, dtype=np.float32)
    for i in range(tok.n_vocab):
        p = tok.piece(i)
        if b'"' in p or b"}" in p or b"]" in p:
            bias[i] = 5.0
    return bias


def walk(grammar, tok, seed, max_tokens=300, bias=None):
    """Sample through the mask from random logits (uniform over what the grammar allows,
    or tilted by bias) until the grammar is done: (text, done, n_tokens)."""
    rng = np.random.default_rng(seed)
    m = grammar.matcher()
    out = []
    for _ in range(max_tokens):
        logits = rng.standard_normal(tok.n_vocab).astype(np.float32)
        if bias is not None:
            logits += bias
        m.mask(logits)
        t = int(np.argmax(logits))
        assert np.isfinite(logits[t])
        m.accept(t)
        if t in tok.eog_ids:
            break
        out.append(t)
        if m.done:
            break
    return tok.decode(out), m.done, len(out)


def test_random_walks_parse_and_validate(smol_tok):
    g = response_format_grammar({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                        "strict": True}}, smol_tok)
    finished = 0
    for seed in range(40):
        text, done, _ = walk(g, smol_tok, seed)
        if done:
            finished += 1
            jsonschema.validate(json.loads(text), PERSON)
    assert finished >= 36  # a few walks may wander in numbers; most end well inside 300 tokens


def test_end_tokens_only_where_the_grammar_may_end(smol_tok):
    eog = sorted(smol_tok.eog_ids)
    m = json_schema_grammar({"type": "integer"}, smol_tok).matcher()
    assert not m.allowed()[eog].any()  # nothing written yet: no end
    for t in smol_tok.encode("12", add_special=False):
        m.accept(t)
    a = m.allowed()
    assert a[eog].all() and a[smol_tok.encode("3", add_special=False)].all()  # may end, or go on
    assert m.accepting and not m.done
    m.accept(eog[0])
    assert m.done

    m = json_schema_grammar({"enum": ["yes", "no"]}, smol_tok).matcher()
    for t in smol_tok.encode('"no"', add_special=False):
        m.accept(t)
    assert m.done  # nothing can follow: only the end tokens are left
    assert np.flatnonzero(m.allowed()).tolist() == eog


def test_accept_refuses_a_forbidden_token_and_keeps_its_state(smol_tok):
    m = json_schema_grammar({"type": "object"}, smol_tok).matcher()
    with pytest.raises(InvalidArgumentError, match="not allowed"):
        m.accept(smol_tok.encode("x", add_special=False)[0])
    with pytest.raises(InvalidArgumentError, match="not allowed"):
        m.accept(min(smol_tok.eog_ids))  # no end before the object
    with pytest.raises(InvalidArgumentError):
        m.accept(smol_tok.n_vocab + 5)
    for t in smol_tok.encode("{}", add_special=False):
        m.accept(t)
    assert m.done


def test_mask_covers_logits_past_the_vocabulary(smol_tok):
    m = json_schema_grammar({"type": "object"}, smol_tok).matcher()
    logits = np.zeros(smol_tok.n_vocab + 64, dtype=np.float32)  # padded embedding rows
    m.mask(logits)
    assert np.isneginf(logits[smol_tok.n_vocab:]).all()
    allowed = np.flatnonzero(np.isfinite(logits))
    assert allowed.size and all(smol_tok.piece(int(t)).startswith(b"{") for t in allowed)


def test_json_object_walks_give_objects(smol_tok, closing_bias):
    g = response_format_grammar({"type": "json_object"}, smol_tok)
    finished = 0
    for seed in range(10):
        text, done, _ = walk(g, smol_tok, seed, bias=closing_bias)
        if done:
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished >= 8


def test_json_object_gemma3_tokenizer(gemma3_path):
    tok = _gguf_tokenizer(gemma3_path)  # another vocabulary: 262k tokens, other end tokens
    try:
        g = response_format_grammar({"type": "json_object"}, tok)
        bias = _closing_bias(tok)
        results = [walk(g, tok, seed, bias=bias) for seed in range(3)]
        assert any(done for _, done, _ in results)
        for text, done, _ in results:
            if done:
                assert isinstance(json.loads(text), dict)
    finally:
        tok.close()


def test_hf_tokenizer(smollm2_path, tmp_path):
    """An HF folder's tokenizer.json (built here from the GGUF's vocabulary) works too."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    mf = GGUFModelFile(smollm2_path)
    tokens = mf.array("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in mf.array("tokenizer.ggml.merges")]
    t = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True, normalized=False)
                          for s, ty in zip(tokens, mf.array("tokenizer.ggml.token_type")) if ty == 3])
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": tokens[2]}))
    tok = HFTokenizer(tmp_path, {"eos_token_id": 2})
    g = json_schema_grammar(PERSON, tok)
    finished = 0
    for seed in range(5):
        text, done, _ = walk(g, tok, seed)
        if done:
            finished += 1
            jsonschema.validate(json.loads(text), PERSON)
    assert finished >= 3


def test_llguidance_tokenizer_built_once(smol_tok):
    assert constrain.ll_tokenizer(smol_tok) is constrain.ll_tokenizer(smol_tok)


def test_closed_tokenizer_refuses(smollm2_path):
    """A grammar of a closed model's tokenizer refuses to start a sequence."""
    tok = _gguf_tokenizer(smollm2_path)
    g = json_schema_grammar({"type": "object"}, tok)
    tok.close()
    with pytest.raises(FlashLMError, match="closed"):
        g.matcher()


GENERATIONS = [  # (prompt, schema): replies of 15 to 30 tokens
    ("Describe a fictional person as JSON with keys name, age and city.",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                       "city": {"type": "string", "maxLength": 30}},
      "required": ["name", "age", "city"], "additionalProperties": False}),
    ("What is the capital of France? Reply in JSON.",
     {"type": "object", "properties": {"country": {"type": "string", "maxLength": 20},
                                       "capital": {"type": "string", "maxLength": 20}},
      "required": ["country", "capital"], "additionalProperties": False}),
    ("Pick a fruit and say its color, as JSON.",
     {"type": "object", "properties": {"fruit": {"enum": ["apple", "banana", "cherry"]},
                                       "color": {"type": "string", "maxLength": 15}},
      "required": ["fruit", "color"], "additionalProperties": False}),
]


def test_model_greedy_generations_validate(smollm2):
    """Model.chat with a grammar: the reply ends where the JSON does, and validates."""
    for prompt, schema in GENERATIONS:
        g = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                                    smollm2.tokenizer)
        chunks = list(smollm2.chat([{"role": "user", "content": prompt}], stream=True, grammar=g, temperature=0,
                                   max_tokens=80))
        assert chunks[-1].finish_reason == "stop"
        jsonschema.validate(json.loads("".join(c.text for c in chunks)), schema)


def _tool_schemas():
    return {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_tools_required_yields_a_valid_call(smol_tok):
    g = tools_grammar(TOOLS, "required", smol_tok)
    params = _tool_schemas()
    finished = 0
    for seed in range(20):
        text, done, _ = walk(g, smol_tok, seed)
        if not done:
            continue
        finished += 1
        content, calls = parse_tool_reply(text)
        assert content is None and len(calls) == 1
        call = calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in params
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[call["function"]["name"]])
    assert finished >= 16


def test_tools_named_choice_and_auto(smol_tok, closing_bias):
    g = tools_grammar(TOOLS, {"type": "function", "function": {"name": "search"}}, smol_tok)
    for seed in range(5):
        text, done, _ = walk(g, smol_tok, seed)
        if done:
            assert parse_tool_reply(text)[1][0]["function"]["name"] == "search"
    g = tools_grammar(TOOLS, "auto", smol_tok)
    kinds = set()
    for seed in range(12):
        text, done, _ = walk(g, smol_tok, seed, bias=closing_bias)
        if done:
            content, calls = parse_tool_reply(text)
            kinds.add("call" if calls else "response")
            assert (content is None) == bool(calls)
    assert kinds == {"call", "response"}
    now = {"type": "function", "function": {"name": "now"}}  # no parameters: arguments {}
    text, done, _ = walk(tools_grammar([now], "required", smol_tok), smol_tok, 0, bias=closing_bias)
    assert done and isinstance(json.loads(parse_tool_reply(text)[1][0]["function"]["arguments"]), dict)
    assert tools_grammar(TOOLS, "none", smol_tok) is None
    assert tools_grammar([], "auto", smol_tok) is None


def test_tool_parameters_with_defs(smol_tok):
    """$defs references in a tool's parameters resolve against the parameters, not the
    reply's wrapper (pydantic and MCP servers write them so)."""
    params = {"$defs": {"Unit": {"enum": ["c", "f"]}}, "type": "object",
              "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "t", "parameters": params}}
    g = tools_grammar([tool], "required", smol_tok)
    text, done, _ = walk(g, smol_tok, 0)
    assert done
    args = json.loads(parse_tool_reply(text)[1][0]["function"]["arguments"])
    jsonschema.validate(args, params)


def test_parse_tool_reply_round_trips():
    content, calls = parse_tool_reply('{"tool_call": {"name": "search", "arguments": {"query": "é", "limit": 2}}}')
    assert content is None
    assert calls[0]["function"]["name"] == "search"
    assert json.loads(calls[0]["function"]["arguments"]) == {"query": "é", "limit": 2}
    assert parse_tool_reply('{"response": "Hello there"}') == ("Hello there", [])
    two = parse_tool_reply('{"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}')[1]
    assert [c["function"]["name"] for c in two] == ["a", "b"] and two[0]["id"] != two[1]["id"]
    assert parse_tool_reply('{"tool_call": {"name": "se') == ('{"tool_call": {"name": "se', [])  # cut short
    assert parse_tool_reply("plain text") == ("plain text", [])


def test_tools_system_prompt():
    text = tools_system_prompt(TOOLS, "auto")
    assert "get_weather" in text and "Current weather in a city." in text
    assert "`tool_call`" in text and "`response`" in text
    assert "`response`" not in tools_system_prompt(TOOLS, "required")
    assert "`search`" in tools_system_prompt(TOOLS, {"type": "function", "function": {"name": "search"}})
    assert tools_system_prompt(TOOLS, "none") == ""


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "does not exist"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "Unsatisfiable"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(unclosed"}}}, "unclosed"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}, "strict": True}},
     "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"schema": [1, 2]}}, "must be a JSON object"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be a boolean"),
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema'"),
    ({"type": "xml"}, "type \"xml\" is not supported"),
    ({"schema": {}}, "needs a 'type'"),
    ("json", "must be an object"),
])
def test_bad_response_format(smol_tok, response_format, message):
    with pytest.raises(InvalidArgumentError, match=message) as e:
        response_format_grammar(response_format, smol_tok)
    assert "\n" not in str(e.value)


def test_lenient_unless_strict(smol_tok):
    """Without strict, keywords llguidance cannot enforce are ignored (best effort), as
    OpenAI's non-strict mode; with strict they are refused (above)."""
    g = response_format_grammar({"type": "json_schema", "json_schema": {
        "schema": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True, "maxItems": 2}}}, smol_tok)
    assert g.warnings and "uniqueItems" in g.warnings[0]
    assert response_format_grammar(None, smol_tok) is None
    assert response_format_grammar({"type": "text"}, smol_tok) is None


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "function", "function": {"description": "no name"}}], "auto", r"tools\[0\].function needs a 'name'"),
    ([{"type": "function", "function": {"name": ""}}], "auto", "needs a 'name'"),
    ([{"type": "function"}], "auto", "needs a 'function' object"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "auto", "not supported"),
    ([WEATHER, WEATHER], "auto", "distinct"),
    ([{"type": "function", "function": {"name": "x", "parameters": "int"}}], "auto", "parameters must be"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}], "auto", "type 'object'"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"properties": {"a": {"type": "foo"}}}}}],
     "auto", "Invalid type"),
    ({"name": "x"}, "auto", "must be an array"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not one of the tools"),
    (TOOLS, "sometimes", "tool_choice \"sometimes\" is not supported"),
    ([], "required", "needs at least one tool"),
])
def test_bad_tools(smol_tok, tools, choice, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tools_grammar(tools, choice, smol_tok)
