"""`flashlm serve` with the real `openai` client against real uvicorn servers on
127.0.0.1, on the real models.

`served` is the command itself, `flashlm serve` in a subprocess (SmolLM2, --parallel 4,
a memory budget, an API key, a slot folder), shared by the module: its RSS is its own to
measure, and stopping it with SIGTERM at the end checks that it shuts down cleanly. The
Gemma server (completions on a base model) and a --parallel 1 server (a disconnect frees
the slot) run in this process, in a thread, through make_app.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request
from types import SimpleNamespace

import jsonschema
import openai
import psutil
import pytest

import flashlm
from flashlm.apps.server import bind, make_app, make_server, url_of

KEY = "sk-flashlm-test"
# the server's --memory-budget: its plan's minimum at -c 1024, with 4 KV caches (--parallel
# 4) and a 64 MiB prompt cache, is 275 MiB
BUDGET = 300 << 20
CTX = 1024
pytestmark = pytest.mark.timeout(600)  # a hang's limit (a fresh checkout compiles the kernels in the first test)

HELLO = [{"role": "user", "content": "Name three colours."}]


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served(smollm2_path, smollm2, tmp_path_factory):
    """`flashlm serve` on SmolLM2 in a subprocess, on a free port (after the smollm2
    fixture's load has compiled the kernels, where a fresh checkout has none)."""
    d = tmp_path_factory.mktemp("serve")
    log = d / "serve.log"
    cmd = [sys.executable, "-m", "flashlm.apps.cli", "serve", "-m", str(smollm2_path), "-c", str(CTX), "-t", "2",
           "--port", "0", "--parallel", "4", "--memory-budget", f"{BUDGET >> 20}MiB", "--cache-ram", "64MiB",
           "--api-key", KEY, "--slot-save-path", str(d / "slots"), "--alias", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not (m := re.search(r"serving smollm2 at (http://\S+)/v1", log.read_text())):
            assert proc.poll() is None and time.monotonic() - t0 < 300, log.read_text()
            time.sleep(0.2)
        url = m.group(1)
        while _http(f"{url}/health").status_code != 200:
            time.sleep(0.1)
        yield SimpleNamespace(url=url, proc=proc, log=log, slots=d / "slots", client=_client(url))
        proc.send_signal(signal.SIGTERM)  # a clean shutdown: exit status 0, having said so
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "flashlm: stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class ThreadServer:
    """make_app's server on model in a thread of this process, on a free port."""

    def __init__(self, model, parallel: int, cache_bytes: int = 0, **kw):
        self.engine = model.batch(parallel=parallel, cache_bytes=cache_bytes)
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = make_server(make_app(model, self.engine, **kw), self.sock, log_level="warning", log_config=None)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 30
            time.sleep(0.05)
        self.client = _client(self.url, "none")

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
        self.sock.close()


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    """Gemma 3 270M base and a server on it (the same Model: the reference runs between requests)."""
    m = flashlm.load(gemma3_path, n_ctx=512, n_threads=2)
    srv = ThreadServer(m, parallel=2, model_id="gemma3")
    yield m, srv
    srv.close()
    m.close()


class Reply(SimpleNamespace):
    """An HTTP reply: status_code, text; json() parses it."""

    def json(self):
        return json.loads(self.text)


def _http(url: str, body=None, key: str | None = KEY) -> Reply:
    """GET url, or POST body (bytes as they are, anything else as JSON), with the key."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(status_code=r.status, text=r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(status_code=e.code, text=e.read().decode())


def _post(url: str, path: str, body, key: str | None = KEY) -> Reply:
    return _http(url + path, body, key)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


# ---- text equals the Python API's ---------------------------------------------------------------------

def test_chat_equals_model_chat(served, smollm2):
    """Greedy chat, plain and streamed, is Model.chat's text; usage counts the prompt as
    Model.chat_tokens renders it; the streamed chunks are OpenAI's (role first, then
    content, then finish_reason, then usage, then [DONE])."""
    want = smollm2.chat(HELLO, max_tokens=24, temperature=0)
    r = served.client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    n_prompt = len(smollm2.chat_tokens(HELLO))
    assert r.object == "chat.completion" and r.model == "smollm2"
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens_details.cached_tokens >= 0 and r.timings["predicted_n"] == r.usage.completion_tokens

    stream = served.client.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == n_prompt and chunks[-1].usage.completion_tokens == 24
    # the same prompt again: its prefix came from the slot, and the text is unchanged
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions_equal_model_generate(served, smollm2, gemma):
    """Greedy completions, plain and streamed, by text and by token ids, are
    Model.generate's, on both models (Gemma 3 is a base model: completion is its use)."""
    gm, gsrv = gemma
    for model, client, prompt in [(smollm2, served.client, "The capital of France is"),
                                  (gm, gsrv.client, "Once upon a time, there was a little")]:
        want = model.generate(prompt, max_tokens=16, temperature=0)
        r = client.completions.create(model="x", prompt=prompt, max_tokens=16, temperature=0)
        assert r.choices[0].text == want and r.object == "text_completion"
        assert r.usage.prompt_tokens == len(model.tokenize(prompt)) and r.usage.completion_tokens == 16
        ids = model.tokenize(prompt)
        r = client.completions.create(model="x", prompt=ids, max_tokens=16, temperature=0)
        assert r.choices[0].text == want
        text, chunks = _stream_text(client.completions.create(model="x", prompt=prompt, max_tokens=16, temperature=0,
                                                              stream=True))
        assert text == want and chunks[-1].choices[0].finish_reason == "length"
    # chat on a model without a chat template renders Model.chat's generic one
    want = gm.chat(HELLO, max_tokens=8, temperature=0)
    assert gsrv.client.chat.completions.create(model="x", messages=HELLO, max_tokens=8,
                                               temperature=0).choices[0].message.content == want


def test_logprobs(served, smollm2):
    """Chat logprobs: one entry per token, its bytes the reply's, the top alternatives
    sorted, the chosen token the best at temperature 0; completions give OpenAI's
    legacy shape."""
    r = served.client.chat.completions.create(model="x", messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob == pytest.approx(tops[0])
    r = served.client.completions.create(model="x", prompt="The capital of France is", max_tokens=4, temperature=0,
                                         logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 4
    assert all(len(d) == 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


# ---- structured output and tools ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}( [A-Z][a-z]{1,15})?$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,12}$"},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}


def test_json_schema_twenty_requests(served):
    """20 sampled replies (different seeds, 4 at a time) under a nested schema: all parse
    and all validate."""
    msgs = [{"role": "user", "content": "Describe a user of our website as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(seed):
        r = served.client.chat.completions.create(model="x", messages=msgs, max_tokens=200, temperature=0.8,
                                                  seed=seed, response_format=fmt)
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(4) as ex:
        replies = list(ex.map(one, range(20)))
    for text, reason in replies:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({t for t, _ in replies}) > 1  # sampled: not one reply twenty times


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 32},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_call_round_trip(served):
    """tool_choice "required": the reply is a call of the tool with arguments its
    schema accepts (finish_reason tool_calls); the client sends the result back; the
    model answers in words."""
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = served.client.chat.completions.create(model="x", messages=msgs, tools=[WEATHER], tool_choice="required",
                                              max_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    r = served.client.chat.completions.create(model="x", messages=msgs, tools=[WEATHER], tool_choice="none",
                                              max_tokens=32, temperature=0)
    assert r.choices[0].message.content.strip() and not r.choices[0].message.tool_calls

    # streamed: the call arrives as a tool_calls delta, then finish_reason tool_calls
    _, chunks = _stream_text(served.client.chat.completions.create(
        model="x", messages=msgs[:1], tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0,
        stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---- the prompt cache ----------------------------------------------------------------------------------------

def _common(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prompt_cache_six_turns(served, smollm2):
    """A 6-turn chat: at turn 6 the tokens computed (prompt_tokens - cached_tokens, and
    timings.prompt_n) are exactly that turn's new tokens: the rendered conversation past
    what the slot holds from turn 5, its prompt and the reply tokens it ran (all of
    them after an end-of-generation token; all but the last after max_tokens, as that
    one was sampled but never run). The reply's tokens are known from its logprobs."""
    questions = ["Hi! Who are you?", "What is the capital of France?", "And of Italy?", "Which one is bigger?",
                 "Name a famous museum there.", "Thanks! Say goodbye."]
    msgs, held = [], None
    for turn, q in enumerate(questions, 1):
        msgs.append({"role": "user", "content": q})
        prompt = smollm2.chat_tokens(msgs)
        r = served.client.chat.completions.create(model="x", messages=msgs, max_tokens=20, temperature=0,
                                                  logprobs=True)
        reply, usage, timings = r.choices[0].message.content, r.usage, r.timings
        computed = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
        assert usage.prompt_tokens == len(prompt) and timings["prompt_n"] == computed
        assert timings["cache_n"] == usage.prompt_tokens_details.cached_tokens
        if held is not None:
            new = len(prompt) - _common(prompt, held)
            assert computed == new, (turn, computed, new)
            assert new < len(prompt) // 2  # most of the conversation came from the cache
        # the reply's tokens: their bytes (logprobs) are the pieces of the reply tokenized
        pieces = [bytes(t.bytes) for t in r.choices[0].logprobs.content]
        ids = smollm2.tokenize(reply, add_special=False)
        assert pieces == [smollm2.tokenizer.piece(i, special=True) for i in ids] and len(ids) == usage.completion_tokens
        ran = ids if r.choices[0].finish_reason == "stop" else ids[:-1]
        held = prompt + ran
        msgs.append({"role": "assistant", "content": reply})
    assert turn == 6 and computed > 0


# ---- load ----------------------------------------------------------------------------------------------------

def _metric(url: str, name: str) -> float:
    text = _http(f"{url}/metrics").text
    return float(re.search(rf"^flashlm_{name} (\S+)$", text, re.M).group(1))


def test_load_sixteen_clients(served):
    """16 clients x 10 requests, streamed and not, 4 prompts: every response arrives,
    complete, and each greedy text is the prompt's single-request one; the requests are
    all counted; the server's RSS above its base stays within the memory budget."""
    prompts = [[{"role": "user", "content": q}] for q in
               ["What is 2+2?", "Name a fruit.", "Say hello in French.", "What colour is the sky?"]]
    one = {i: served.client.chat.completions.create(model="x", messages=p, max_tokens=8, temperature=0)
           for i, p in enumerate(prompts)}
    want = {i: (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)
            for i, r in one.items()}
    base = _metric(served.url, "base_resident_bytes")
    before = _metric(served.url, "requests_total")
    server, peak, done = psutil.Process(served.proc.pid), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.02)

    def client(c):
        api, got = _client(served.url), []
        for k in range(10):
            i = (c + k) % len(prompts)
            if k % 2:
                text, chunks = _stream_text(api.chat.completions.create(
                    model="x", messages=prompts[i], max_tokens=8, temperature=0, stream=True,
                    stream_options={"include_usage": True}))
                got.append((i, (text, chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)))
            else:
                r = api.chat.completions.create(model="x", messages=prompts[i], max_tokens=8, temperature=0)
                got.append((i, (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)))
        return got

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as ex:
            results = [x for got in ex.map(client, range(16)) for x in got]
    finally:
        done.set()
        sampler.join()
    assert len(results) == 160
    for i, got in results:
        assert got == want[i], (i, got, want[i])
    assert _metric(served.url, "requests_total") - before == 160
    assert _metric(served.url, "queue_depth") == 0 and _metric(served.url, "requests_processing") == 0
    # the plan counts the 4 KV caches and the prompt cache: the model's share of RSS stays within its budget
    assert peak[0] - base <= BUDGET, f"RSS {peak[0] >> 20} MiB - base {int(base) >> 20} MiB over {BUDGET >> 20} MiB"


def test_disconnect_frees_the_slot(smollm2_path):
    """--parallel 1: a client that leaves a 2000-token stream after its first chunks
    frees the one slot at once (its job cancelled at the next step), and the next
    request runs while the first, had it gone on, would still be decoding; so does a
    client that stops waiting for a reply that is not streamed."""
    m = flashlm.load(smollm2_path, n_ctx=2048, n_threads=2)
    srv = ThreadServer(m, parallel=1)
    try:
        stream = srv.client.chat.completions.create(model="x", messages=HELLO, max_tokens=2000, temperature=0,
                                                    stream=True)
        chunks = iter(stream)
        next(chunks)
        next(chunks)
        stream.close()
        t0 = time.monotonic()
        while srv.engine.active:
            assert time.monotonic() - t0 < 5, "the slot was not freed"
            time.sleep(0.01)
        r = srv.client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                               temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
        assert srv.engine.counters["generated_tokens"] < 200  # of the 2000 the first asked for
        assert srv.engine.active == 0 and srv.engine.queue_depth == 0
        # a client that gives up waiting for a reply that is not streamed frees the slot too
        with pytest.raises(openai.APITimeoutError):
            srv.client.with_options(timeout=1.0).chat.completions.create(model="x", messages=HELLO, max_tokens=2000,
                                                                          temperature=0)
        t0 = time.monotonic()
        while srv.engine.active:
            assert time.monotonic() - t0 < 5, "the slot was not freed"
            time.sleep(0.01)
        assert srv.engine.counters["generated_tokens"] < 600
    finally:
        srv.close()
        m.close()


# ---- bad requests -------------------------------------------------------------------------------------------

def _is_openai_error(r: Reply, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    return err


@pytest.mark.parametrize("body, message, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON", None),
    ({"model": "x"}, "Missing required parameter: 'messages'", "messages"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens must be at least 1", "max_tokens"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}, "Unsatisfiable", "response_format"),
    ({"messages": [{"role": "user", "content": "hello " * 1200}]}, "context", "messages"),
    ({"messages": HELLO, "temperature": "hot"}, "Invalid value for 'temperature'", "temperature"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "messages[0].content"),
    ({"messages": HELLO, "n": 2}, "n must be 1", "n"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'", "messages[0].role"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"description": "no name"}}]}, "needs a 'name'",
     "tools"),
    (b"[1, 2]", "must be a JSON object", None),
])
def test_bad_request(served, body, message, param):
    """Each gets a 400 with OpenAI's error JSON naming the problem, and the server
    goes on serving."""
    r = _post(served.url, "/v1/chat/completions", body)
    err = _is_openai_error(r, 400)
    assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"
    ok = served.client.chat.completions.create(model="x", messages=HELLO, max_tokens=2, temperature=0)
    assert ok.choices[0].message.content


def test_bad_requests_through_the_client(served):
    """The openai client raises its own errors: BadRequestError for an oversized prompt
    (code context_length_exceeded), AuthenticationError for a wrong or missing key;
    /health needs no key."""
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model="x", prompt="hello " * 1200, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "context" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        _client(served.url, "sk-wrong").models.list()
    err = _is_openai_error(_post(served.url, "/v1/chat/completions", {"messages": HELLO}, key=None), 401)
    assert err["code"] == "invalid_api_key"
    _is_openai_error(_post(served.url, "/v1/completions", {"prompt": "x"}, key="sk-wrong"), 401)
    assert _http(f"{served.url}/health", key=None).json() == {"status": "ok"}
    _is_openai_error(_post(served.url, "/v1/nothing", {}), 404)


# ---- the other endpoints ----------------------------------------------------------------------------------------

def test_models_tokenize_metrics(served, smollm2):
    """/v1/models names the model; /tokenize and /detokenize round trip (llama-server's
    shapes); /metrics is Prometheus text with every figure."""
    (m,) = served.client.models.list().data
    assert m.id == "smollm2" and m.object == "model" and m.meta["n_ctx"] == CTX
    text = "Hello, world! Ünïcödé ✓"
    toks = _post(served.url, "/tokenize", {"content": text}).json()["tokens"]
    assert toks == smollm2.tokenize(text, add_special=False)
    assert _post(served.url, "/detokenize", {"tokens": toks}).json() == {"content": text}
    pieces = _post(served.url, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world" and all(isinstance(p["id"], int) for p in pieces)
    _is_openai_error(_post(served.url, "/detokenize", {"tokens": [10**9]}), 400)
    metrics = _http(f"{served.url}/metrics").text
    for name in ["requests_total", "prompt_tokens_total", "tokens_predicted_total", "prompt_tokens_cached_total",
                 "tokens_per_second", "queue_depth", "requests_processing", "memory_budget_bytes", "resident_bytes",
                 "bytes_read_total", "prompt_cache_bytes"]:
        assert re.search(rf"^# TYPE flashlm_{name} (counter|gauge)\nflashlm_{name} [0-9.e+]+$", metrics, re.M), name
    assert _metric(served.url, "memory_budget_bytes") == BUDGET and _metric(served.url, "requests_total") > 0
    assert _metric(served.url, "resident_bytes") > _metric(served.url, "base_resident_bytes") > 0


def test_slots_save_and_restore(served):
    """POST /slots/ID?action=save writes a slot's tokens and KV cache under
    --slot-save-path, restore reads them back (into another slot too); bad names,
    actions and slots get 400s."""
    served.client.chat.completions.create(model="x", messages=HELLO, max_tokens=4, temperature=0)
    saved = [_post(served.url, f"/slots/{i}?action=save", {"filename": f"slot{i}.bin"}).json() for i in range(4)]
    assert all((served.slots / f"slot{s['id_slot']}.bin").stat().st_size == s["n_written"] for s in saved)
    full = max(saved, key=lambda s: s["n_saved"])
    assert full["n_saved"] > 20
    r = _post(served.url, "/slots/3?action=restore", {"filename": full["filename"]}).json()
    assert r["n_restored"] == full["n_saved"] and r["id_slot"] == 3
    for path, body, message in [("/slots/0?action=save", {"filename": "../x"}, "plain file name"),
                                ("/slots/0?action=restore", {"filename": "missing.bin"}, "no saved slot"),
                                ("/slots/0?action=erase", {"filename": "x"}, "action must be"),
                                ("/slots/9?action=save", {"filename": "x"}, "slot must be")]:
        assert message in _is_openai_error(_post(served.url, path, body), 400)["message"]


def test_slot_restore_serves_the_prompt_cache(smollm2_path, tmp_path):
    """One slot, no prompt cache: a conversation's slot saved, overwritten by another
    prompt, restored from the file: the first prompt again is served from it."""
    m = flashlm.load(smollm2_path, n_ctx=512, n_threads=2)
    srv = ThreadServer(m, parallel=1, slot_save_path=tmp_path)
    try:
        def ask(msgs):
            return srv.client.chat.completions.create(model="x", messages=msgs, max_tokens=4, temperature=0)

        other = [{"role": "user", "content": "Something else entirely."}]
        first = ask(HELLO)
        assert _post(srv.url, "/slots/0?action=save", {"filename": "a"}, key=None).json()["n_saved"] > 30
        ask(other)
        control = ask(HELLO).usage.prompt_tokens_details.cached_tokens  # the system prompt they share, only
        ask(other)
        assert _post(srv.url, "/slots/0?action=restore", {"filename": "a"}, key=None).status_code == 200
        again = ask(HELLO)
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2 > control
        assert again.choices[0].message.content == first.choices[0].message.content
    finally:
        srv.close()
        m.close()


# ---- the command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--cache-ram", "lots"], "bad size 'lots'"),
    (["--temp", "-1"], "temperature must be >= 0"),
    (["-n", "0"], "-n must be at least 1"),
    (["--api-key", " "], "--api-key needs a non-empty key"),
    (["-m", "/no/such/model.gguf"], "/no/such/model.gguf"),
])
def test_serve_bad_flags(capsys, argv, message):
    """A bad flag is one line on stderr and exit status 2, before anything loads."""
    from flashlm.apps.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashlm: error:") and "\n" not in err and message in err, err


def test_serve_port_in_use(capsys, smollm2_path):
    """A port another program holds: one line naming it, before the model loads."""
    from flashlm.apps.cli import main

    with bind("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        assert main(["serve", "-m", str(smollm2_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "\n" not in err
