"""Tokenizers and chat templates.

GGUF models tokenize with gguf_tokenizer.GGUFTokenizer: `tokenizers` objects built from
the file's vocabulary, giving llama.cpp's token ids exactly. HF folders tokenize with
`tokenizers` from their tokenizer.json.
Chat messages render through the model's own jinja2 `chat_template`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
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
    """Silence writes to stderr, C-level and Python-level (llama.cpp, the benchmarks'
    baseline, logs some lines whatever its settings)."""
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
