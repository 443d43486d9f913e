"""Tokenizers and chat templates.

GGUF models tokenize with llama.cpp itself (a vocab-only llama_cpp model), so token ids
are exactly llama.cpp's. HF folders tokenize with `tokenizers` (tokenizer.json).
Chat messages render through the model's own jinja2 `chat_template`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import sys
import weakref
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import FlashLMError, InvalidArgumentError, ModelFormatError
from ..formats.validate import check_regular_file

# Templates for models whose file carries none. Gemma's is Google's published one;
# anything else falls back to ChatML.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALLBACK_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


class ChatTemplate:
    """A jinja2 chat template rendered as transformers and llama-cpp-python render it.
    own: whether the model's file carried it (a base model's carries none, and gets a
    generic fallback: a format it never learned)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", own: bool = True):
        self.source, self.own = source, own
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelFormatError(f"the model's chat template does not parse ({e})") from e

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (else tools go in as text)."""
        return self.own and "tools" in self.source

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise FlashLMError(f"chat message {m!r} needs 'role' and 'content' keys")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **template_vars)
        except jinja2.TemplateError as e:
            raise FlashLMError(f"chat template rejected the messages: {e}") from e


def _raise_exception(message):
    raise jinja2.TemplateError(message)


@contextlib.contextmanager
def quiet_stderr():
    """Silence writes to stderr, C-level and Python-level (llama.cpp logs some lines
    whatever its settings)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # not a real file (captured)
        fd = None
    if fd is None or fd < 0:  # (textual's capture reports -1)
        py_stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            yield
        finally:
            sys.stderr = py_stderr
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    py_stderr = sys.stderr
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        sys.stderr = devnull  # llama-cpp-python's log callback prints to sys.stderr
        try:
            yield
        finally:
            sys.stderr = py_stderr
            os.dup2(saved, fd)
            os.close(saved)


class LlamaCppTokenizer:
    """llama.cpp's tokenizer for a GGUF file (loads the vocabulary only, no weights).

    llama.cpp trusts the file: a fault in it (an assertion, an exception out of a C
    call, a read out of bounds) ends the process. So the loader hands it only files whose
    vocabulary formats.validate.check_tokenizer passed, and token ids only inside it."""

    def __init__(self, path: str | Path, metadata: dict, arch: str):
        import llama_cpp
        import llama_cpp._logger

        llama_cpp._logger.logger.setLevel(logging.CRITICAL + 1)  # silence all of llama.cpp's log lines
        self._lib = llama_cpp
        # The C API directly: the high-level Llama object would also build a context
        # and sampler we never use (13 MB more, measured).
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with quiet_stderr():
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:  # it throws (and returns nothing) on what it does not know, such as the pre-tokenizer
            kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
            raise ModelFormatError(f"{path}: llama.cpp could not read the vocabulary (tokenizer.ggml.model {kind!r},"
                                   f" tokenizer.ggml.pre {pre!r}); use a GGUF made by a recent llama.cpp")
        self._free = weakref.finalize(self, llama_cpp.llama_model_free, model)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.eog_ids = frozenset(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        own = metadata.get("tokenizer.chat_template")
        self.template = ChatTemplate(own or FALLBACK_TEMPLATES.get(arch, CHATML_TEMPLATE),
                                     self.piece(self.bos_id, special=True).decode("utf-8", "replace"),
                                     self.piece(self.eos_id, special=True).decode("utf-8", "replace"), own=bool(own))

    def _check_ids(self, tokens) -> None:
        # llama.cpp looks ids up with .at(): one outside the vocabulary throws through
        # its C API, which aborts the process
        if not _ids_within(tokens, self.n_vocab):
            raise InvalidArgumentError(f"token ids must be integers in [0, {self.n_vocab})")

    def _v(self):
        if not self._free.alive:
            raise FlashLMError("the model is closed; load it again to use its tokenizer")
        return self._vocab

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; add_special adds BOS if the model wants it."""
        data = _utf8(text)  # (llama.cpp's tokenizer throws on bytes that are not UTF-8: the process aborts)
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._v(), data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needed {-n} slots")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The text of token (b"" for an id outside the vocabulary, as a missing BOS's -1)."""
        if not 0 <= token < self.n_vocab:
            return b""
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._v(), token, buf, 256, 0, special)
        return buf.raw[:max(n, 0)]

    def decode(self, tokens: list[int], skip_special: bool = True) -> str:
        """Text of `tokens`, as llama.cpp's llama_detokenize gives it."""
        if not tokens:
            return ""
        self._check_ids(tokens)
        arr = (self._lib.llama_token * len(tokens))(*tokens)
        size = 16 * len(tokens) + 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._v(), arr, len(tokens), buf, size, skip_special, not skip_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 16

    def close(self):
        self._free()  # once; later calls do nothing


class HFTokenizer:
    """An HF folder's tokenizer.json (via `tokenizers`) and tokenizer_config.json."""

    def __init__(self, folder: Path, hf_config: dict):
        self._tok = _read_tokenizer(folder / "tokenizer.json")
        tcfg = _read_json(folder / "tokenizer_config.json")
        self.n_vocab = self._tok.get_vocab_size()

        def token_id(key):
            tok = tcfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                i = self._tok.token_to_id(tok)
                return (-1 if i is None else i), tok
            i = hf_config.get(key + "_id")
            return (i, self._tok.id_to_token(i) or "") if self._is_id(i) else (-1, "")

        self.bos_id, bos = token_id("bos_token")
        self.eos_id, eos = token_id("eos_token")
        self.add_bos = bool(tcfg.get("add_bos_token", False)) and self.bos_id >= 0
        eog = [self.eos_id] + _as_list(hf_config.get("eos_token_id"))
        self.eog_ids = frozenset(i for i in eog if self._is_id(i))
        src = tcfg.get("chat_template")
        own = isinstance(src, str) and bool(src)
        self.template = ChatTemplate(src if own else CHATML_TEMPLATE, bos, eos, own=own)

    def _is_id(self, i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_vocab

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        _utf8(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_special and self.add_bos else []) + ids

    def decode(self, tokens: list[int], skip_special: bool = True) -> str:
        tokens = [int(t) for t in tokens] if _ids_within(tokens, 2**31) else None
        if tokens is None:  # (ids past its vocabulary, as padded embedding rows give, it skips)
            raise InvalidArgumentError("token ids must be non-negative 32-bit integers")
        return self._tok.decode(tokens, skip_special_tokens=skip_special)

    def close(self):
        pass


def _utf8(text) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text to tokenize must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise InvalidArgumentError(f"the text is not valid Unicode ({e.reason} at {e.start})") from None


def _ids_within(tokens, n: int) -> bool:
    return all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < n for t in tokens)


def _as_list(v):
    return v if isinstance(v, list) else [v]


def _read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.exists():
        raise ModelFormatError(f"{path.parent}: no tokenizer.json in the model folder")
    check_regular_file(path)
    try:
        return Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tokenizers raises Exception, or pyo3's PanicException (a BaseException)
        raise ModelFormatError(f"{path}: not a tokenizer `tokenizers` can read ({str(e)[:200]});"
                               " download the model again") from e


def _read_json(path: Path) -> dict:
    """A JSON object file, or {} where there is none."""
    if not path.exists():
        return {}
    check_regular_file(path)
    try:
        v = json.loads(path.read_bytes())
    except ValueError as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e}); download the model again") from e
    if not isinstance(v, dict):
        raise ModelFormatError(f"{path}: not a JSON object; download the model again")
    return v
