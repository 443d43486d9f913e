"""`flashlm serve`: an OpenAI-compatible HTTP server (FastAPI, uvicorn, sse-starlette) on
the batched engine (runtime/batch.py), so that editors, chat front-ends, agents and
LangChain can use a model here as they would OpenAI, llama-server or vLLM.

    POST /v1/chat/completions   messages, tools, response_format; streamed as SSE chunks
    POST /v1/completions        a prompt as text or token ids
    GET  /v1/models
    POST /tokenize, /detokenize llama-server's shapes
    GET  /health, /metrics      liveness; Prometheus text
    POST /slots/{id}?action=save|restore   a slot's KV cache to and from --slot-save-path

Requests follow OpenAI's shapes: an unknown field is ignored, a wrong type, a bad value
or a prompt over the context gets a 400 with OpenAI's error JSON (never a truncated
prompt). Every response carries `usage` (with the prompt tokens the prompt cache served)
and llama-server's `timings`.

A generation runs in the engine's thread; a request's own thread (_Feed) waits on its
Job and hands each chunk to the event loop, so the loop never blocks. A client that
disconnects cancels its job at once, freeing its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import ContextLengthError, FlashLMError, InvalidArgumentError
from ..runtime import constrain
from ..units import format_size

# Sampling when a request gives none: OpenAI's temperature and top_p (1.0: the API's
# documented defaults, which clients assume), and llama-server's top_k 40 and min_p 0.05
# (OpenAI has neither; they cut the tail a small model otherwise wanders into).
DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=40, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
_PUBLIC = {"/health"}  # paths that answer without the API key (a load balancer's probe)


# ---- errors, in OpenAI's shape ------------------------------------------------------------

class APIError(Exception):
    """A request the server refuses: HTTP status, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status, headers=headers)


def _validation_error(errors: list[dict]) -> APIError:
    """The first problem pydantic found, as OpenAI words it ("Missing required parameter:
    'messages'.", "Invalid value for 'max_tokens': ...")."""
    def param(loc) -> str:
        out = ""
        for part in loc:
            if part in ("body", "path", "query"):
                continue
            if isinstance(part, int):
                out += f"[{part}]"
            elif "[" in part or part in _TYPE_TAGS:  # a member of a union, not a field
                continue
            else:
                out += f".{part}" if out else part
        return out

    first = next((e for e in errors if e["type"] == "missing"), errors[0])
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return _bad(f"The request body is not valid JSON ({detail}); send a JSON object.")
    where = param(first["loc"])
    if not where:
        return _bad("The request body must be a JSON object.")
    if first["type"] == "missing":
        return _bad(f"Missing required parameter: '{where}'.", where)
    msgs = list(dict.fromkeys(e["msg"] for e in errors if param(e["loc"]) == where))
    return _bad(f"Invalid value for '{where}': {' or '.join(msgs)}.", where)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "ContentPart"}


# ---- request bodies ---------------------------------------------------------------------------

class _Body(BaseModel):
    """Request fields: an unknown one is ignored (as OpenAI does), a wrong type refused
    (strict: "1" is not a number, 1.0 not an integer)."""
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: str = "function"
    function: ToolCallFunction


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama-server's extras from here
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    cache_prompt: bool = True


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False  # llama-server's default
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class SlotRequest(_Body):
    filename: str


async def _parse(request: Request, kind: type[BaseModel]):
    """The request's JSON body as `kind`, whatever its content type (curl -d sends form
    encoding); a 400 naming the problem otherwise."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else None
    except ValueError as e:
        raise _bad(f"The request body is not valid JSON ({e}); send a JSON object.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


# ---- the app ---------------------------------------------------------------------------------------

class Server:
    """What the endpoints share: the model, its engine and the settings."""

    def __init__(self, model, engine, *, api_key: str | None, model_id: str, defaults: dict,
                 max_tokens: int | None, slot_save_path: str | os.PathLike | None, base_rss: int | None):
        self.model, self.engine, self.api_key, self.model_id = model, engine, api_key, model_id
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.max_tokens = max_tokens
        self.slot_save_path = Path(slot_save_path) if slot_save_path is not None else None
        self.base_rss = base_rss
        self.created = int(time.time())
        self.proc = psutil.Process()
        self.closing = False  # shutting down: new generations are refused (503)

    # -- a request's generation settings --------------------------------------------------------

    def _settings(self, body: _Generation, max_tokens: int | None) -> dict:
        if body.n != 1:
            raise _bad(f"n must be 1 (one choice per request), got {body.n}; send several requests instead", "n")
        if max_tokens is None:
            max_tokens = self.max_tokens or self.model.n_ctx  # until the model ends or the context is full
        elif max_tokens < 1:
            raise _bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if "" in stop:
            raise _bad("stop strings must not be empty (one would end every reply before it began)", "stop")
        out = dict(max_tokens=max_tokens, stop=stop, cache_prompt=body.cache_prompt, seed=body.seed)
        for k in DEFAULTS:
            v = getattr(body, k)
            out[k] = self.defaults[k] if v is None else v
        return out

    def _submit(self, prompt, settings: dict, param: str, **kw):
        if self.closing:
            raise APIError(503, "the server is shutting down; try again once it is back", kind="server_error")
        try:
            return self.engine.submit(prompt, **settings, **kw)
        except ContextLengthError as e:  # never truncated: the client decides what to drop
            raise _bad(f"{e} (the server's context is set by `flashlm serve -c N`)", param,
                       "context_length_exceeded") from None

    def start_chat(self, body: ChatRequest) -> tuple[Any, bool, bool]:
        """Render, tokenize and submit a chat request (in a worker thread: the template,
        the tokenizer and the grammar's compile take time); the Job, whether the reply is
        a tool-call reply to parse, and whether logprobs were asked for."""
        settings = self._settings(body, body.max_completion_tokens if body.max_completion_tokens is not None
                                  else body.max_tokens)
        if not body.messages:
            raise _bad("messages must hold at least one message", "messages")
        tokenizer = self.model.tokenizer
        native = tokenizer.template.supports_tools
        tools_grammar = None
        prompt_text = ""
        if body.tools is not None:
            with _param("tools"):
                tools_grammar = constrain.tools_grammar(body.tools, body.tool_choice, tokenizer)
                prompt_text = constrain.tools_system_prompt(body.tools, body.tool_choice)
        elif body.tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        with _param("response_format"):
            grammar = constrain.response_format_grammar(body.response_format, tokenizer)
        if grammar is not None and tools_grammar is not None:
            raise _bad("response_format and tools cannot constrain one reply together; send tools with "
                       "tool_choice 'none', or no response_format", "response_format")
        messages = _messages(body.messages, native)
        if prompt_text:
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt_text}".lstrip()}
            else:
                messages.insert(0, {"role": "system", "content": prompt_text})
        template_vars = {"tools": body.tools} if native and body.tools else {}
        tokens = self.model.chat_tokens(messages, **template_vars)
        logprobs = None
        if body.logprobs:
            logprobs = body.top_logprobs or 0
            if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise _bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", "top_logprobs")
        job = self._submit(tokens, settings, "messages", grammar=grammar or tools_grammar, logprobs=logprobs)
        return job, tools_grammar is not None, logprobs is not None

    def start_completion(self, body: CompletionRequest):
        """Submit a completion request (in a worker thread); the Job, the text to echo
        before the completion ("" unless echo), and whether logprobs were asked for."""
        settings = self._settings(body, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise _bad(f"prompt: one prompt per request, got {len(prompt)}; send several requests", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str) and not prompt:
            raise _bad("prompt must not be empty", "prompt")
        if isinstance(prompt, list) and not prompt:
            raise _bad("prompt must hold at least one token", "prompt")
        logprobs = body.logprobs
        if logprobs is not None and not 0 <= logprobs <= 5:
            raise _bad(f"logprobs must be in [0, 5], got {logprobs}", "logprobs")
        echo = ""
        if body.echo:
            with _param("prompt"):
                echo = prompt if isinstance(prompt, str) else self.model.detokenize(prompt)
        job = self._submit(prompt, settings, "prompt", logprobs=logprobs)
        return job, echo, logprobs is not None

    # -- what goes back -------------------------------------------------------------------------------

    def usage(self, job, last) -> dict:
        n_gen = last.n_generated if last is not None else 0
        return {"prompt_tokens": job.n_prompt, "completion_tokens": n_gen, "total_tokens": job.n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": job.n_cached}}

    def timings(self, job, last) -> dict:
        """llama-server's `timings`: cache_n prompt tokens reused, prompt_n computed; the
        times from the speeds the last chunk reports."""
        prompt_n = job.n_prompt - job.n_cached
        predicted_n = last.n_generated if last is not None else 0
        pp, tps = (last.prompt_tokens_per_second, last.tokens_per_second) if last is not None else (0.0, 0.0)
        prompt_ms = prompt_n / pp * 1e3 if pp else 0.0
        predicted_ms = predicted_n / tps * 1e3 if tps else 0.0
        return {"cache_n": job.n_cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms else 0.0,
                "predicted_n": predicted_n, "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
                "predicted_per_second": predicted_n / predicted_ms * 1e3 if predicted_ms else 0.0}

    def token_bytes(self, token: int) -> bytes:
        tok = self.model.tokenizer
        if hasattr(tok, "piece"):
            return tok.piece(token, special=True)
        return tok.decode([token], skip_special=False).encode("utf-8")

    def chat_logprobs(self, lps) -> list[dict]:
        def one(token, lp):
            b = self.token_bytes(token)
            return {"token": b.decode("utf-8", "replace"), "logprob": _finite(lp), "bytes": list(b)}

        return [{**one(t.token, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top]} for t in lps]

    def completion_logprobs(self, lps, offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in lps:
            text = self.token_bytes(t.token).decode("utf-8", "replace")
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(t.logprob))
            out["top_logprobs"].append({self.token_bytes(i).decode("utf-8", "replace"): _finite(lp)
                                        for i, lp in t.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def metrics(self) -> str:
        e, c = self.engine, self.engine.counters
        rows = [
            ("requests_total", "counter", "requests submitted to the engine", c["requests"]),
            ("prompt_tokens_total", "counter", "prompt tokens of the requests started", c["prompt_tokens"]),
            ("prompt_tokens_cached_total", "counter", "prompt tokens the prompt cache served (not computed)",
             c["cached_tokens"]),
            ("tokens_predicted_total", "counter", "tokens generated", c["generated_tokens"]),
            ("decode_steps_total", "counter", "batched decode steps", c["steps"]),
            ("tokens_per_second", "gauge", "decode speed over the recent steps, all sequences together",
             e.tokens_per_second()),
            ("queue_depth", "gauge", "requests waiting for a slot", e.queue_depth),
            ("requests_processing", "gauge", "requests being prefilled or decoded", e.active),
            ("slots", "gauge", "sequences decoded together at most (--parallel)", e.parallel),
            ("memory_budget_bytes", "gauge", "the model's memory budget (0: none set)", self.model.memory_budget or 0),
            ("resident_bytes", "gauge", "resident memory of the process (RSS)", self.proc.memory_info().rss),
            ("bytes_read_total", "counter", "weight bytes streamed from disk by decode steps", c["bytes_read"]),
            ("prompt_cache_bytes", "gauge", "bytes the prompt cache holds", e.cache_used),
            ("prompt_cache_limit_bytes", "gauge", "bytes the prompt cache may hold (--cache-ram)", e.cache_bytes),
        ]
        if self.base_rss is not None:
            rows.append(("base_resident_bytes", "gauge",
                         "RSS before the model loaded (kernels in): what the budget does not cover", self.base_rss))
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP flashlm_{name} {help_}", f"# TYPE flashlm_{name} {kind}", f"flashlm_{name} {value}"]
        return "\n".join(out) + "\n"


@contextlib.contextmanager
def _param(name: str):
    """A FlashLMError raised inside as a 400 naming the request field it came from."""
    try:
        yield
    except ContextLengthError:
        raise
    except FlashLMError as e:
        raise _bad(str(e), name) from None


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf


def _text(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's parts (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _bad(f"{where}.content[{i}]: only text parts are supported (this server runs text models), "
                       f"not {part.type!r}", f"{where}.content")
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(args) -> dict | str:
    if isinstance(args, dict):
        return args
    try:
        return json.loads(args)
    except ValueError:
        return args


def _messages(messages: list[Message], native_tools: bool) -> list[dict]:
    """OpenAI's messages as the chat template takes them. Where the template has no tool
    syntax of its own, as llama.cpp's generic handler does: an assistant's tool calls
    become the JSON the model writes for them ({"tool_call": ...}), and a tool's result a
    user message {"tool_response": {"tool", "tool_call_id", "content"}}."""
    out, names = [], {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        content = _text(m.content, where)
        role = m.role
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            for c in m.tool_calls:
                if c.id:
                    names[c.id] = c.function.name
            if native_tools:
                out.append({"role": "assistant", "content": content,
                            "tool_calls": [{"id": c.id, "type": "function", "function": f}
                                           for c, f in zip(m.tool_calls, calls)]})
            else:
                text = json.dumps({"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls},
                                  ensure_ascii=False)
                out.append({"role": "assistant", "content": text})
        elif role in ("tool", "function"):
            name = m.name or names.get(m.tool_call_id or "")
            if native_tools:
                out.append({k: v for k, v in (("role", "tool"), ("content", content), ("name", name),
                                              ("tool_call_id", m.tool_call_id)) if v is not None})
            else:
                response = {k: v for k, v in (("tool", name), ("tool_call_id", m.tool_call_id)) if v is not None}
                response["content"] = content
                out.append({"role": "user", "content": json.dumps({"tool_response": response}, indent=2,
                                                                  ensure_ascii=False)})
        elif role in ("system", "user", "assistant"):
            out.append({"role": role, "content": content})
        else:
            raise _bad(f"{where}.role {role!r} is not one of system, developer, user, assistant, tool",
                       f"{where}.role")
    return out


class _Feed:
    """A job's chunks on the event loop: a thread of its own waits on the job (blocking)
    and hands each chunk over, so the loop never blocks."""

    def __init__(self, job):
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._run, name="flashlm-request", daemon=True).start()

    def _run(self) -> None:
        try:
            for chunk in self.job:
                self._put(chunk)
            self._put(None)
        except BaseException as e:  # (the request's handler answers it)
            self._put(e)

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutting down): nobody reads on
            self.job.cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


async def _all(feed: _Feed, request: Request) -> list:
    """Every chunk of a non-streamed reply; a client that leaves meanwhile cancels it."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        feed.job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return [c async for c in feed]
    except BaseException:
        feed.job.cancel()
        raise
    finally:
        watcher.cancel()


def _generation_error(e: BaseException) -> APIError:
    """A generation that failed after it was accepted: a 500 (a FlashLMError says what
    went wrong in one line; anything else is a bug, logged with its traceback)."""
    if not isinstance(e, FlashLMError):
        logging.getLogger("uvicorn.error").error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}" if not isinstance(e, FlashLMError)
                    else f"generation failed: {e}", kind="server_error")


class _KeyCheck:
    """With --api-key: a request without `Authorization: Bearer KEY` gets OpenAI's 401.
    Plain ASGI, not BaseHTTPMiddleware: it must leave streaming and disconnects alone."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in _PUBLIC:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                msg = ("Incorrect API key provided." if given else
                       "You didn't provide an API key: send it as the header 'Authorization: Bearer KEY'.")
                await _error_response(APIError(401, msg, code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(model, engine, *, api_key: str | None = None, model_id: str | None = None, defaults: dict | None = None,
             max_tokens: int | None = None, slot_save_path: str | os.PathLike | None = None,
             base_rss: int | None = None) -> FastAPI:
    """The server's FastAPI app on a loaded model and its batch engine (the caller closes
    both). defaults: sampling settings for requests that give none (DEFAULTS's keys);
    max_tokens: the limit of a request that sets none (None: the context); base_rss: the
    process's RSS before the model loaded, shown by /metrics."""
    srv = Server(model, engine, api_key=api_key, model_id=model_id or model.path.name, defaults=defaults,
                 max_tokens=max_tokens, slot_save_path=slot_save_path, base_rss=base_rss)
    app = FastAPI(title="flashlm", summary="an OpenAI-compatible server", docs_url="/docs", redoc_url=None)
    app.state.server = srv
    if api_key:
        app.add_middleware(_KeyCheck, key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(FlashLMError)
    async def _flashlm_error(request, e: FlashLMError):
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
        return _error_response(_bad(str(e), code=code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return _error_response(_validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), kind=kind))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # (uvicorn logs its traceback too)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    async def generation(request: Request, body_type, start, prefix: str, events):
        """Parse the body and start its job. A streamed request: its SSE response. Else,
        once the job has finished: (job, what start returned beside it, whether logprobs
        were asked for, id, created, the chunks)."""
        body = await _parse(request, body_type)
        job, extra, want_lp = await run_in_threadpool(start, body)
        feed = _Feed(job)
        ident, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(events(srv, feed, ident, created, extra, want_lp, include_usage),
                                       background=BackgroundTask(job.cancel))  # (a client gone before it began)
        try:
            chunks = await _all(feed, request)
        except Exception as e:  # (answered as an OpenAI error)
            raise _generation_error(e) from e
        return job, extra, want_lp, ident, created, chunks

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request):
        out = await generation(request, ChatRequest, srv.start_chat, "chatcmpl", _chat_events)
        if isinstance(out, EventSourceResponse):
            return out
        job, tools, want_lp, ident, created, chunks = out
        text = "".join(c.text for c in chunks)
        last = chunks[-1] if chunks else None
        reason = last.finish_reason if last is not None else "stop"
        message = {"role": "assistant", "content": text}
        if tools:
            content, calls = constrain.parse_tool_reply(text)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
                reason = "tool_calls"
        lps = [lp for c in chunks for lp in c.logprobs]
        return {"id": ident, "object": "chat.completion", "created": created, "model": srv.model_id,
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": srv.chat_logprobs(lps)} if want_lp else None,
                             "finish_reason": reason}],
                "usage": srv.usage(job, last), "timings": srv.timings(job, last)}

    @app.post("/v1/completions")
    @app.post("/completions", include_in_schema=False)
    async def completions(request: Request):
        out = await generation(request, CompletionRequest, srv.start_completion, "cmpl", _completion_events)
        if isinstance(out, EventSourceResponse):
            return out
        job, echo, want_lp, ident, created, chunks = out
        last = chunks[-1] if chunks else None
        lps = [lp for c in chunks for lp in c.logprobs]
        return {"id": ident, "object": "text_completion", "created": created, "model": srv.model_id,
                "choices": [{"index": 0, "text": echo + "".join(c.text for c in chunks),
                             "logprobs": srv.completion_logprobs(lps, len(echo)) if want_lp else None,
                             "finish_reason": last.finish_reason if last is not None else "stop"}],
                "usage": srv.usage(job, last), "timings": srv.timings(job, last)}

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def models():
        m = model
        return {"object": "list", "data": [{
            "id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "flashlm",
            "meta": {"name": m.name, "path": str(m.path), "arch": m.config.arch, "n_ctx": m.n_ctx,
                     "n_ctx_train": m.config.n_ctx_train, "n_vocab": m.config.n_vocab, "parallel": engine.parallel,
                     "chat_template": m.has_chat_template, "memory_budget": m.memory_budget}}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _parse(request, TokenizeRequest)
        ids = await run_in_threadpool(model.tokenize, body.content, body.add_special)
        if body.with_pieces:
            return {"tokens": [{"id": i, "piece": srv.token_bytes(i).decode("utf-8", "replace")} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _parse(request, DetokenizeRequest)
        n = model.config.n_vocab
        if any(not 0 <= t < n for t in body.tokens):
            raise _bad(f"token ids must be in [0, {n})", "tokens")
        return {"content": await run_in_threadpool(model.detokenize, body.tokens)}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/slots/{slot}")
    async def slots(slot: int, action: str, request: Request):
        """llama-server's slot save and restore: a slot's tokens and KV cache to a file
        under --slot-save-path, and back."""
        if srv.slot_save_path is None:
            raise APIError(501, "slot save and restore are off: start the server with --slot-save-path DIR",
                           kind="not_supported_error")
        if action not in ("save", "restore"):
            raise _bad(f"action must be 'save' or 'restore', not {action!r}", "action")
        body = await _parse(request, SlotRequest)
        name = body.filename
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or len(name) > 255:
            raise _bad(f"filename {name!r} must be a plain file name (no folders)", "filename")
        path = srv.slot_save_path / name
        t0 = time.perf_counter()
        if action == "save":
            def save():
                with open(path, "wb") as f:  # (a file object: np.savez would add .npz to a name)
                    n = engine.save_slot(slot, f)
                return n, path.stat().st_size

            n, size = await run_in_threadpool(save)
            return {"id_slot": slot, "filename": name, "n_saved": n, "n_written": size,
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
        if not path.is_file():
            raise _bad(f"no saved slot {name!r} in {srv.slot_save_path}", "filename")
        n = await run_in_threadpool(engine.restore_slot, slot, str(path))
        return {"id_slot": slot, "filename": name, "n_restored": n, "n_read": path.stat().st_size,
                "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}

    return app


def _sse(obj) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False)}


async def _chat_events(srv: Server, feed: _Feed, ident: str, created: int, tools: bool, want_lp: bool,
                       include_usage: bool):
    """A streamed chat reply: chat.completion.chunk events (the first with the role, the
    last with finish_reason), the usage chunk if asked for, then [DONE]. A tool-call reply
    is held back until its JSON is complete, then sent as one tool_calls delta. Leaving
    (the client gone: sse-starlette cancels this) cancels the job."""
    job = feed.job

    def chunk(delta: dict, reason=None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": srv.model_id,
                     "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        yield chunk({"role": "assistant", "content": ""})
        held, last, lps = [], None, []
        try:
            async for c in feed:
                last = c
                if tools:
                    held.append(c.text)
                    lps += c.logprobs
                elif c.text:
                    lp = {"content": srv.chat_logprobs(c.logprobs)} if want_lp else None
                    yield chunk({"content": c.text}, logprobs=lp)
        except Exception as e:  # (the stream has begun: the error goes in it)
            err = _generation_error(e)
            yield _sse(error_body(err.message, err.kind))
            return
        reason = last.finish_reason if last is not None else "stop"
        if tools:
            content, calls = constrain.parse_tool_reply("".join(held))
            lp = {"content": srv.chat_logprobs(lps)} if want_lp else None
            if calls:
                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}, logprobs=lp)
                reason = "tool_calls"
            elif content:
                yield chunk({"content": content}, logprobs=lp)
        yield chunk({}, reason)
        if include_usage:
            yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": srv.model_id,
                        "choices": [], "usage": srv.usage(job, last),
                        "timings": srv.timings(job, last)})
        yield {"data": "[DONE]"}
    finally:
        job.cancel()  # (a finished job ignores it)


async def _completion_events(srv: Server, feed: _Feed, ident: str, created: int, echo: str, want_lp: bool,
                             include_usage: bool):
    """A streamed completion: text_completion events, the last with finish_reason, the
    usage chunk if asked for, then [DONE]."""
    job = feed.job

    def chunk(text: str, reason=None, logprobs=None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return _sse({"id": ident, "object": "text_completion", "created": created, "model": srv.model_id,
                     "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        offset = len(echo)
        if echo:
            yield chunk(echo)
        last = None
        try:
            async for c in feed:
                last = c
                if c.text:
                    lp = srv.completion_logprobs(c.logprobs, offset) if want_lp else None
                    offset += len(c.text)
                    yield chunk(c.text, logprobs=lp)
        except Exception as e:  # (the stream has begun: the error goes in it)
            err = _generation_error(e)
            yield _sse(error_body(err.message, err.kind))
            return
        yield chunk("", last.finish_reason if last is not None else "stop")
        if include_usage:
            yield _sse({"id": ident, "object": "text_completion", "created": created, "model": srv.model_id,
                        "choices": [], "usage": srv.usage(job, last),
                        "timings": srv.timings(job, last)})
        yield {"data": "[DONE]"}
    finally:
        job.cancel()


# ---- running it --------------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); InvalidArgumentError, one
    line, where it cannot be had (in use, or an unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"--host {host}: not an address here ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port} ({e.strerror}); pick another with --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "info", **config):
    """A uvicorn server for app on the bound socket (run it with .run(sockets=[sock])).
    Ctrl+C or SIGTERM stops it: the generations running end at their next step (their
    replies with finish_reason "cancelled"), the connections close, and run() returns so
    that the caller closes the engine and the model (uvicorn would raise the signal again
    once stopped, ending the process before that)."""
    import uvicorn

    srv = app.state.server

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)  # (sse-starlette's hook in it ends open streams)
            self._captured_signals.clear()
            srv.closing = True
            threading.Thread(target=srv.engine.close, daemon=True).start()  # (it waits for the step running)

    host, port = sock.getsockname()[:2]
    return _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                                  lifespan="off", **config))


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(model, *, host: str = "127.0.0.1", port: int = 8080, sock: socket.socket | None = None,
          api_key: str | None = None, slot_save_path: str | os.PathLike | None = None, model_id: str | None = None,
          defaults: dict | None = None, max_tokens: int | None = None, base_rss: int | None = None) -> None:
    """Serve model on host:port (or on sock, bound already: see bind) until Ctrl+C or
    SIGTERM, printing its URL and memory plan first. Its engine decodes the sequences and
    keeps the prompt cache that flashlm.load(parallel=, cache_ram=) planned; it is closed
    after, the model is the caller's to close."""
    sock = sock if sock is not None else bind(host, port)
    engine = model.batch()
    try:
        app = make_app(model, engine, api_key=api_key, model_id=model_id, defaults=defaults, max_tokens=max_tokens,
                       slot_save_path=slot_save_path, base_rss=base_rss)
        server = make_server(app, sock)
        kv = engine.parallel * model.n_ctx * model.kv_bytes_per_position
        cache = format_size(engine.cache_bytes) if engine.cache_bytes else "off"
        print(f"flashlm: serving {app.state.server.model_id} at {url_of(sock)}/v1 (OpenAI-compatible; Ctrl+C stops)")
        print(f"  {engine.parallel} sequences decoded together, context {model.n_ctx} each (KV caches up to "
              f"{format_size(kv)} at {model.cache_type}); prompt cache {cache}{'; API key required' if api_key else ''}")
        print(model.plan.table() if model.plan is not None else
              "  no memory budget (--memory-budget sets one, and prints its plan here)")
        if not model.has_chat_template:
            print(f"flashlm: warning: {app.state.server.model_id} has no chat template (a base model?): "
                  "/v1/chat/completions renders a generic one; use /v1/completions", file=sys.stderr)
        sys.stdout.flush()
        server.run(sockets=[sock])
        print("flashlm: stopped")
    finally:
        engine.close()
        sock.close()
