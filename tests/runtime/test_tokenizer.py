"""Tokenization and chat templates agree with llama.cpp's."""

import ctypes

import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

import flashlm
from flashlm.runtime.tokenizer import quiet_stderr

CORPUS = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs    of     spaces",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어, עברית, العربية",
    "Emoji 🙂🚀👩‍👩‍👧‍👦 and symbols ∑∫√∞ ≤≥ — “quotes” ‘single’ …",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "numbers 1234567890 3.14159 -42 1e-9 0xFF",
    "",
    " ",
    "a" * 300,
]


@pytest.fixture(scope="module", params=["smollm2_path", "gemma3_path"])
def pair(request):
    path = request.getfixturevalue(request.param)
    with quiet_stderr():
        ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    with flashlm.load(path, n_ctx=64) as m:
        yield m, ref


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_tokenize_matches_llama_cpp(pair, text):
    m, ref = pair
    assert m.tokenize(text) == ref.tokenize(text.encode(), add_bos=True, special=True)
    assert m.tokenize(text, add_special=False) == ref.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_detokenize_round_trip(pair, text):
    m, ref = pair
    tokens = m.tokenize(text, add_special=False)
    assert m.detokenize(tokens) == ref.detokenize(tokens).decode("utf-8", "replace")
    if "<" not in text:  # special tokens are dropped from text, as in llama.cpp
        assert m.detokenize(tokens) == text


MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke\nabout cats."}],
    [{"role": "system", "content": "Sé breve. 🙂"}, {"role": "user", "content": "  spaces  "}],
]


@pytest.mark.parametrize("messages", MESSAGES, ids=range(len(MESSAGES)))
def test_chat_template_matches_llama_cpp_python(smollm2, messages):
    tok = smollm2.tokenizer
    ref = Jinja2ChatFormatter(tok.template.source, eos_token=tok.template.eos_token, bos_token=tok.template.bos_token)
    assert tok.template.render(messages) == ref(messages=messages).prompt


def _cpp_template(name, messages):
    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(name, arr, len(messages), True, buf, 8192)
    assert 0 < n < 8192
    return buf.raw[:n].decode()


@pytest.mark.parametrize("messages", MESSAGES[1:], ids=[1, 2])
def test_chat_templates_match_llama_cpp_builtin(smollm2, gemma3_path, messages):
    # llama.cpp's C++ renderer (chatml for SmolLM2; gemma for Gemma 3, whose file has no
    # template). SmolLM2's jinja template adds a default system prompt when there is
    # none, which the C++ chatml does not, so these cases all carry a system message.
    assert smollm2.tokenizer.template.render(messages) == _cpp_template(b"chatml", messages)
    with flashlm.load(gemma3_path, n_ctx=64) as g:
        text = g.tokenizer.template.render(messages)
        assert text == g.tokenizer.template.bos_token + _cpp_template(b"gemma", messages)


def test_chat_does_not_double_bos(gemma3_path):
    with flashlm.load(gemma3_path, n_ctx=128) as g:
        text = g.tokenizer.template.render(MESSAGES[0])
        assert text.startswith("<bos>")
        tokens = g.tokenize(text, add_special=False)
        assert tokens.count(g.tokenizer.bos_id) == 1
