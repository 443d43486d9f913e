"""Structured output: decoding constrained by a grammar (llguidance) to JSON that a schema
accepts, for OpenAI's `response_format` and `tools`.

A Grammar is compiled once per request for one tokenizer; each sequence walks it with
its own Matcher: `mask(logits)` before sampling puts -inf on every token the grammar
forbids (end-of-generation tokens only where the grammar may end), `accept(token)`
after. llguidance computes the mask as a bitmask in tens of microseconds; applying it
is two vectorised numpy calls.

Tool calls use llama.cpp's "generic" format, for chat templates with no tool syntax of
their own: the reply is JSON, {"tool_call": {"name": ..., "arguments": {...}}} or
{"response": "..."}; tools_system_prompt tells the model so, parse_tool_reply reads it
back into OpenAI's shape.
"""

from __future__ import annotations

import json
import threading
import uuid
import weakref

import numpy as np

from ..errors import FlashLMError, InvalidArgumentError
from .gguf_tokenizer import CONTROL, USER_DEFINED, GGUFTokenizer

# Whitespace between JSON tokens: none, one space, or a newline and up to 20 spaces or
# tabs of indent (llama.cpp's `space` rule). Unbounded whitespace lets a model (or a
# random walk) pad forever without finishing the value.
_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
_MAX_MESSAGE = 300  # characters of llguidance's message kept in an error

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency
        raise FlashLMError("structured output needs llguidance: pip install llguidance") from e
    return llguidance


def ll_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (GGUFTokenizer or HFTokenizer), built once
    per tokenizer object and cached while it lives: building walks the whole vocabulary
    (0.16 s for 49k tokens, 1 s for 262k, measured on 2 cores)."""
    with _LL_LOCK:  # one build per tokenizer, even with requests arriving together
        llt = _LL_TOKENIZERS.get(tokenizer)
        if llt is None:
            llt = _LL_TOKENIZERS[tokenizer] = _build_ll_tokenizer(tokenizer)
        return llt


def _build_ll_tokenizer(tokenizer):
    llg = _llg()
    eog = sorted(int(i) for i in getattr(tokenizer, "eog_ids", ())) or None
    try:
        if isinstance(tokenizer, GGUFTokenizer):  # its pieces, special marks, and encode
            return llg.LLTokenizer(llg.TokenizerWrapper(_GGUFVocab(tokenizer)), n_vocab=tokenizer.n_vocab,
                                   eos_token=eog if eog is not None else tokenizer.eos_id)
        if hasattr(tokenizer, "_tok"):  # HFTokenizer: the `tokenizers` object, as JSON
            return llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=tokenizer.n_vocab, eos_token=eog)
    except (ValueError, RuntimeError, TypeError) as e:
        raise FlashLMError(f"structured output is not available for this tokenizer ({_one_line(e)})") from e
    raise FlashLMError(f"structured output is not available for a {type(tokenizer).__name__}")


class _GGUFVocab:
    """A GGUF tokenizer as llguidance.TokenizerWrapper takes one: every token's piece, with
    llguidance's special-token marker (0xff) before control tokens and user-defined ones
    that look like them (the grammar never produces them as text), and encode without
    special tokens. (Twice as fast to build as the `tokenizers` JSON: 1.45 s against 2.8 s
    for Gemma 3's 262k tokens, measured.)"""

    def __init__(self, tok: GGUFTokenizer):
        self._tok = tok
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id if tok.bos_id >= 0 else None
        self.special_token_ids = []
        attr = tok._attr
        self.tokens = []
        for i in range(tok.n_vocab):
            piece = tok.piece(i, True)
            if attr[i] & CONTROL or (attr[i] & USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")):
                piece = b"\xff" + piece
            self.tokens.append(piece)

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_special=False, parse_special=False)


def _alive(tokenizer) -> None:
    if getattr(tokenizer, "_closed", False):
        raise FlashLMError("the model is closed; load it again to use its tokenizer")


def _one_line(msg, limit: int = _MAX_MESSAGE) -> str:
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class Grammar:
    """A grammar compiled for one tokenizer (llguidance). Compiling checks it: an
    InvalidArgumentError names what llguidance rejected. Build it with
    json_schema_grammar, response_format_grammar or tools_grammar."""

    def __init__(self, tokenizer, grammar: str, *, what: str = "grammar"):
        llg = _llg()
        _alive(tokenizer)
        self.tokenizer = tokenizer
        self._llt = ll_tokenizer(tokenizer)
        # the prototype every Matcher copies: one compile per request, not per sequence
        self._proto = llg.LLMatcher(self._llt, grammar, log_level=0,
                                    limits=llg.LLParserLimits(verbose_errors=False))
        if self._proto.is_error():
            raise InvalidArgumentError(f"{what}: {_one_line(self._proto.get_error())}")
        self.warnings = [_one_line(w) for w in self._proto.get_grammar_warnings()]

    def matcher(self) -> Matcher:
        """A fresh Matcher at the grammar's start, for one sequence."""
        _alive(self.tokenizer)
        return Matcher(self._proto.deep_copy(), self._llt.vocab_size)


class Matcher:
    """One sequence's state in a grammar: mask the logits, sample, accept the token,
    until `done`."""

    def __init__(self, ll_matcher, vocab_size: int):
        self._m = ll_matcher
        self._n = vocab_size
        self._bits = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)

    def _compute(self) -> None:
        if not self._m.is_error():
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._m.is_error():  # (an earlier failure, or a parser limit hit computing this mask)
            raise FlashLMError(f"structured output failed: {_one_line(self._m.get_error())}")

    def allowed(self) -> np.ndarray:
        """Bool array (vocab_size,): the tokens the grammar allows next. End-of-generation
        tokens are among them only where the grammar may end."""
        self._compute()
        # bit i of little-endian word w is token 32*w + i: byte order then bit order little
        return np.unpackbits(self._bits.view(np.uint8), count=self._n, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> None:
        """In place: -inf on the logits of every token the grammar forbids next (and on
        any past the tokenizer's vocabulary, as padded embedding rows give)."""
        self._compute()
        n = min(self._n, logits.shape[-1])
        # the inverted bits unpacked are the forbidden tokens, with no second pass to negate
        forbidden = np.unpackbits(np.invert(self._bits).view(np.uint8), count=n, bitorder="little").view(bool)
        np.copyto(logits[..., :n], -np.inf, where=forbidden)
        logits[..., n:] = -np.inf

    def accept(self, token: int) -> None:
        """Advance past `token` (an end-of-generation token ends the grammar where it may
        end). InvalidArgumentError, the state unchanged, if the grammar forbids it."""
        token = int(token)
        if not 0 <= token < self._n or self._m.validate_tokens([token]) != 1:
            raise InvalidArgumentError(f"token {token} is not allowed by the grammar here")
        if not self._m.consume_token(token):
            raise FlashLMError(f"structured output failed: {_one_line(self._m.get_error())}")

    @property
    def done(self) -> bool:
        """The grammar is complete and can only end: stop generating (finish_reason "stop")."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def accepting(self) -> bool:
        """The text so far is complete, though the grammar may still let it go on (a number)."""
        return self._m.is_accepting()

    def reset(self) -> None:
        """Back to the grammar's start."""
        self._m.reset()


def json_schema_grammar(schema, tokenizer, *, strict: bool = False, what: str = "json_schema") -> Grammar:
    """A Grammar for JSON that `schema` (a JSON Schema dict, or True) accepts. strict:
    reject keywords llguidance cannot enforce (uniqueItems, not, if/then, contains, an
    unknown format) instead of ignoring them, as OpenAI's strict mode promises the schema
    holds; whatever the setting, a schema that is invalid or unsatisfiable is rejected."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidArgumentError(f"{what}: the schema must be a JSON object, not {_kind(schema)}")
    options = {"whitespace_pattern": _WHITESPACE, "lenient": not strict,
               "coerce_one_of": True}  # oneOf as anyOf: pydantic's unions use it
    try:
        grammar = _llg().LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError) as e:  # not JSON-serialisable (NaN, a set) or not an object
        raise InvalidArgumentError(f"{what}: not a valid JSON schema ({_one_line(e)})") from e
    return Grammar(tokenizer, grammar, what=what)


def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def response_format_grammar(response_format: dict | None, tokenizer) -> Grammar | None:
    """The Grammar OpenAI's `response_format` asks for: None (or {"type": "text"}) ->
    None, unconstrained; {"type": "json_object"} -> any JSON object (or llama.cpp's
    {"type": "json_object", "schema": {...}}); {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}} -> JSON that schema accepts.
    InvalidArgumentError, one line, for a malformed one or a schema llguidance rejects."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidArgumentError(f"response_format must be an object, not {_kind(response_format)}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
        return json_schema_grammar(schema, tokenizer, what="response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidArgumentError("response_format of type 'json_schema' needs a 'json_schema' object"
                                       " holding the 'schema'")
        if "schema" not in spec:
            raise InvalidArgumentError("response_format.json_schema needs a 'schema' (a JSON Schema object)")
        name, strict = spec.get("name"), spec.get("strict")
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentError(f"response_format.json_schema.name must be a string, not {_kind(name)}")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidArgumentError(f"response_format.json_schema.strict must be a boolean, not {_kind(strict)}")
        return json_schema_grammar(spec["schema"], tokenizer, strict=bool(strict),
                                   what=f"response_format.json_schema{f' {name!r}' if name else ''}")
    if kind is None:
        raise InvalidArgumentError("response_format needs a 'type': 'text', 'json_object' or 'json_schema'")
    raise InvalidArgumentError(f"response_format type {_short(kind)} is not supported;"
                               " use 'text', 'json_object' or 'json_schema'")


def _short(v) -> str:
    return _one_line(json.dumps(v, ensure_ascii=False, default=str), 60)


# ---- tools -----------------------------------------------------------------------------

_NO_PARAMETERS = {"type": "object", "properties": {}}


def _functions(tools) -> list[dict]:
    """The tools' function objects, checked: a list of {"type": "function", "function":
    {"name", "description"?, "parameters"?}} with distinct names and schema parameters."""
    if not isinstance(tools, list):
        raise InvalidArgumentError(f"tools must be an array of tool objects, not {_kind(tools)}")
    seen, out = set(), []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidArgumentError(f"{where} must be an object, not {_kind(tool)}")
        if tool.get("type", "function") != "function":
            raise InvalidArgumentError(f"{where}: tool type {_short(tool.get('type'))} is not supported; use 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidArgumentError(f"{where} needs a 'function' object with a 'name'")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(f"{where}.function needs a 'name' (a non-empty string)")
        if name in seen:
            raise InvalidArgumentError(f"{where}: two tools are named {name!r}; tool names must be distinct")
        seen.add(name)
        params = fn.get("parameters", _NO_PARAMETERS)
        if params is None:
            params = _NO_PARAMETERS
        if not isinstance(params, (dict, bool)):
            raise InvalidArgumentError(f"{where}.function.parameters must be a JSON Schema object,"
                                       f" not {_kind(params)}")
        if isinstance(params, dict) and params.get("type", "object") != "object":
            raise InvalidArgumentError(f"{where}.function.parameters must be a schema of type 'object' (the"
                                       f" arguments are a JSON object), not type {_short(params['type'])}")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise InvalidArgumentError(f"{where}.function.description must be a string, not {_kind(desc)}")
        out.append({**fn, "parameters": {} if params is True else params})
    return out


def _choice(tool_choice, names: list[str]) -> str | None:
    """tool_choice as "auto", "required", "none" or the one tool's name it forces."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("auto", "required", "none"):
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function":
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidArgumentError("tool_choice needs {'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise InvalidArgumentError(f"tool_choice names {name!r}, which is not one of the tools"
                                       f" ({', '.join(names) or 'none given'})")
        return name
    raise InvalidArgumentError(f"tool_choice {_short(tool_choice)} is not supported; use 'auto', 'required',"
                               " 'none' or {'type': 'function', 'function': {'name': ...}}")


def _tool_call_schema(fn: dict, i: int) -> dict:
    args = fn["parameters"]
    # "#/$defs/..." inside a tool's parameters points at the parameters' own root: a $id
    # makes it the base for those references once nested in the reply's schema
    if "$id" not in args:
        args = {**args, "$id": f"urn:flashlm:tool:{i}"}
    if "type" not in args:  # arguments are an object, whatever else the schema allows
        args = {**args, "type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": args},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_grammar(tools: list[dict], tool_choice, tokenizer) -> Grammar | None:
    """The Grammar for a reply in llama.cpp's generic tool-call format: the JSON object
    {"tool_call": {"name": <a tool's name>, "arguments": <JSON its parameters accept>}}
    or {"response": "<text>"}. tool_choice "auto" (or None) -> either; "required" -> a
    tool call; {"type": "function", "function": {"name": X}} -> a call of X; "none" ->
    None. No tools -> None. InvalidArgumentError names a malformed tool or choice."""
    fns = _functions(tools if tools is not None else [])
    names = [f["name"] for f in fns]
    choice = _choice(tool_choice, names)
    if choice == "none":
        return None
    if not fns:
        if choice == "auto":
            return None
        raise InvalidArgumentError(f"tool_choice {_short(tool_choice)} needs at least one tool")
    picked = [(i, f) for i, f in enumerate(fns) if choice in ("auto", "required") or f["name"] == choice]
    calls = [_tool_call_schema(f, i) for i, f in picked]
    call = {"type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
            "required": ["tool_call"], "additionalProperties": False}
    schema = call
    if choice == "auto":
        reply = {"type": "object", "properties": {"response": {"type": "string"}},
                 "required": ["response"], "additionalProperties": False}
        schema = {"anyOf": [call, reply]}
    strict = any(f.get("strict") is True for _, f in picked)
    return json_schema_grammar(schema, tokenizer, strict=strict, what="tools")


def tools_system_prompt(tools, tool_choice=None) -> str:
    """The text to add to the system message: the tools as JSON, then the reply format
    tools_grammar enforces (as llama.cpp's generic handler tells the model). "" where
    tool_choice is "none" or there are no tools."""
    fns = _functions(tools if tools is not None else [])
    choice = _choice(tool_choice, [f["name"] for f in fns])
    if choice == "none" or not fns:
        return ""
    listed = [{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in fns]
    call = '{"tool_call": {"name": "<tool name>", "arguments": {<the arguments, as its parameters describe>}}}'
    lines = ["You can call the following tools:", json.dumps(listed, indent=2, ensure_ascii=False), ""]
    if choice == "auto":
        lines += [("Respond in JSON format, either with `tool_call` (a request to call a tool) or with"
                   " `response` (your reply to the user's request):"), call, "or", '{"response": "<your reply>"}']
    elif choice == "required":
        lines += ["Respond in JSON format with `tool_call`, a request to call one of the tools:", call]
    else:
        lines += [f"Respond in JSON format with `tool_call`, a request to call the tool `{choice}`:",
                  call.replace("<tool name>", choice)]
    return "\n".join(lines)


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _tool_call(call) -> dict | None:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    return {"id": call["id"] if isinstance(call.get("id"), str) and call["id"] else _call_id(),
            "type": "function",
            "function": {"name": call["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse_tool_reply(text: str) -> tuple[str | None, list[dict]]:
    """A generic-format reply back into (content, tool_calls), tool_calls in OpenAI's
    shape [{"id": "call_...", "type": "function", "function": {"name": ..., "arguments":
    "<JSON string>"}}] and content None beside them. Text that is not such JSON (a reply
    cut short by max_tokens) comes back whole as the content."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return text, []
    if isinstance(data, dict):
        if "tool_call" in data:
            call = _tool_call(data["tool_call"])
            if call is not None:
                return None, [call]
        elif isinstance(data.get("tool_calls"), list):  # llama.cpp's parallel form
            calls = [_tool_call(c) for c in data["tool_calls"]]
            if calls and all(c is not None for c in calls):
                return None, calls
        elif "response" in data:
            r = data["response"]
            return (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)), []
    return text, []

