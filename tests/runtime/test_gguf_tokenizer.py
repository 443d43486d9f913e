"""GGUFTokenizer (Hugging Face `tokenizers`, built from the GGUF's own vocabulary) against
llama.cpp, the oracle: the same token ids for every way of calling it, the same pieces,
the same detokenized text, the same special tokens.

Each vocabulary gets one test over a few thousand strings, generated from a fixed seed
(fragments of many kinds mixed: unicode of many scripts, emoji, code, runs of spaces and
newlines, digits, special tokens' texts whole and in part, characters no vocabulary has),
plus a handwritten list; a test reports the first mismatches it finds."""

from __future__ import annotations

import ctypes
import functools
import random
import re
import time

import gguf
import pytest

from flashlm.errors import ModelFormatError
from flashlm.formats.modelfile import GGUFModelFile
from flashlm.runtime.gguf_tokenizer import GGUFTokenizer

llama_cpp = pytest.importorskip("llama_cpp")

N_STRINGS = 5000

HANDWRITTEN = [
    "", " ", "  ", "   ", "\n", "\n\n", "\n\n\n\n\n\n", "\t", "\t\t", " \t \n", "\r\n", "\r\n\r\n", "\r", "a\rb",
    "Hello, world!", "Hello world", " Hello", "  Hello", "hello  world", "Hello\n\nworld",
    "I'm sure it's what they've said: we'll, I'd, you're, she'S, THEY'LL, it’s",
    "don't 's 't 're 've 'm 'll 'd 'x '", " ' ", "a ' b", "x 's", "x 're 'm 've", "Hello , world . How ?! ok",
    "1", "12", "123", "1234", "12345678901234567890", "3.14159 -42 1e-9 0xFF 1,000,000", "٣٤٥ ١٢٣ ²³ ½ Ⅻ",
    "café naïve Straße Ελληνικά русский 中文字符 日本語のテキスト 한국어 עברית العربية",
    "e\u0301 a\u0308 n\u0303 o\u0302\u0323 \u0915\u094d\u0937 ก\u0e34 \u05e9\u05c1\u05b8",
    "Emoji 🙂🚀👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷🇯🇵 ❤️ ✨ 🫠", "👨‍💻👩🏾‍🔬🧑‍🤝‍🧑",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != 0: pass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; }\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start", "im_start|>", "<|im_start|", "<<|im_end|>>", "<|im_end|>|>", "<|<|im_end|>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n", "<start_of_turn><end_of_turn>",
    "<start_of_", "_of_turn>", "<bos><eos><pad><unk><mask>", "<unused0><unused99>",
    "<table><tr><td>x</td></tr></table>",
    "<0x41><0xE4>", "[multimodal]", "<start_of_image>", "\u00a0\u2003\u3000 \u2028\u2029\u0085",
    "\x00\x01\x1f\x7f", "\ue000\U000f0000\U0010fffd", "\ufffd\ufeff\u200b\u200d", "𐀀𒀀𠀀𪜀", "\U0001fae8\U0001f6dc",
    "a" * 300, " " * 70, "\n" * 40, "\t" * 40, "ab" * 120, "1" * 100, "!" * 50, "你" * 64,
]

SPECIAL_TEXTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
                 "<pad>", "<unk>", "<mask>", "<unused7>", "<table>", "</td>", "<h1>", "[multimodal]", "<reponame>",
                 "<file_sep>", "<jupyter_code>", "<|eot_id|>", "<s>", "</s>", "<|begin_of_text|>"]

FRAGMENTS = {
    "ascii": ["the", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "HTTP",
              "camelCase", "snake_case", "x", "I", "a", "Z", "etc.", "U.S.A.", "e-mail", "O'Neil", "it's",
              "we'll", "THEY'RE", "you've", "I'M", "'d", "'s", "’s", "isn't", "can't", "rock'n'roll"],
    "punct": [".", ",", "!", "?", ";", ":", "...", "—", "–", "-", "(", ")", "[", "]", "{", "}", "\"", "'", "`", "“",
              "”", "‘", "’", "«", "»", "¿", "¡", "…", "•", "§", "©", "®", "™", "%", "&", "*", "@", "#", "$", "€",
              "£", "¥", "^", "~", "|", "\\", "/", "<", ">", "=", "+", "_", "。", "，", "、", "！", "？", "：", "；",
              "「", "」", "《", "》", "·", "·", "‰", "†", "∑", "∫", "√", "∞", "≤", "≥", "≠", "→", "⇒", "∀", "∃"],
    "latin": ["café", "naïve", "Straße", "ÆØÅ", "œuvre", "façade", "jalapeño", "Ångström", "Zürich", "İstanbul",
              "ﬁnance", "ǅemal", "ſtraße", "Ωmega", "µs", "K", "Å"],
    "cyrillic_greek": ["русский", "Привет", "мир", "Ελληνικά", "αβγ", "ΣΊΣΥΦΟΣ", "українська", "ёжик"],
    "cjk": ["中文", "字符", "你好世界", "日本語", "のテキスト", "カタカナ", "ひらがな", "한국어", "안녕하세요", "漢字", "繁體",
            "简体", "東京", "〜", "ー", "々", "ｱｲｳ", "ＡＢＣ", "１２３", "㐀", "𠀀", "𪜀", "丶"],
    "rtl": ["עברית", "שָׁלוֹם", "العربية", "مرحبا", "السَّلَامُ", "فارسی", "اردو", "ܐܪܡܝܐ", "\u200f", "\u200e"],
    "indic_sea": ["हिन्दी", "नमस्ते", "বাংলা", "தமிழ்", "తెలుగు", "ಕನ್ನಡ", "ภาษาไทย", "ສະບາຍດີ", "ខ្មែរ", "မြန်မာ",
                  "ქართული", "Հայերեն", "አማርኛ"],
    "combining": ["e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323", "\u0301", "\u0308\u0308", "Z\u0351\u036b\u0343",
                  "\u0915\u094d\u0937", "ก\u0e34", "a\u20dd", "1\ufe0f\u20e3"],
    "emoji": ["🙂", "🚀", "😀", "👍", "👍🏽", "👩‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "✨", "🫠", "👨‍💻", "🧑‍🤝‍🧑",
              "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "☕", "⚡", "🤖", "🦀", "🐍", "\U0001fae8", "🧑🏿‍🦱", "👁️‍🗨️", "©️"],
    "code": ["def", "return", "if x != 0:", "for (int i = 0; i < n; ++i)", "{", "}", "=>", "->", "::", "==",
             "!==", "&&", "||", "<<=", ">>>", "/* c */", "// x", "# note", "import numpy as np", "fn main() {}",
             "x[i][j]", "f(a, b)", "'''", "\"\"\"", "\\n", "\\t", "0x7f", "__init__", "self.x = y", "print('hi')",
             "<div class=\"a\">", "</div>", "$HOME", "`cmd`", "SELECT * FROM t;", "a=b&c=d", "https://x.io/a?b=c"],
    "digits": ["0", "1", "7", "42", "123", "1234", "2024", "31415926535", "000", "9999999999999999999",
               "3.14", "-1", "+12", "1e10", "1,234", "1_000", "½", "²", "٣", "١٢٣", "১২৩", "๓", "Ⅻ", "①", "𝟙𝟚"],
    "space": [" ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\n\n\n\n\n\n\n", "\r\n",
              "\r\n\r\n", "\r", " \n", "\n ", " \t ", "\t\n", "\u00a0", "\u3000", "\u2003", "\u2028", "\u0085",
              "\x0b", "\x0c", " " * 33, "\n" * 33, "\t" * 33, "\r\n " * 3],
    "special": SPECIAL_TEXTS + ["<|im_start", "|im_end|>", "<|", "|>", "<start_of_", "of_turn>", "<unused",
                                "<0x0A>", "<0xE4>", "<0x", "▁", "▁▁", "Ġ", "Ċ", "<", ">", "</", "/>"],
    "rare": ["\x00", "\x01", "\x1f", "\x7f", "\x80", "\x9f", "\ue000", "\uf8ff", "\U000f0000", "\U0010fffd",
             "\ufffd", "\ufeff", "\u200b", "\u200d", "\u2060", "\ufdd0", "\uffff", "𐀀", "𒀀", "𓀀", "𝔘", "𝕏",
             "\U0001d11e", "\U000e0001", "\u0378", "\u0bfa", "\u2fff", "\U0003134a"],
}
_CATEGORIES = list(FRAGMENTS)
_JOINERS = ["", "", "", " ", " ", " ", "\n", "  ", "\t", "\n\n", ", ", ". "]
# codepoints to draw at random: every plane's assigned-or-not characters, no surrogates
_RANGES = [(0x0, 0x1F), (0x20, 0x7E), (0x7F, 0x9F), (0xA0, 0x24F), (0x250, 0x2FF), (0x300, 0x36F), (0x370, 0x52F),
           (0x530, 0x10FF), (0x1100, 0x1FFF), (0x2000, 0x2BFF), (0x2C00, 0x2FFF), (0x3000, 0x9FFF), (0xA000, 0xD7FF),
           (0xE000, 0xFFFD), (0x10000, 0x1FFFF), (0x20000, 0x3FFFF), (0x40000, 0xDFFFF), (0xE0000, 0x10FFFF)]


def _random_char(rng: random.Random) -> str:
    lo, hi = rng.choice(_RANGES)
    return chr(rng.randint(lo, hi))


@functools.lru_cache(maxsize=4)
def corpus(n: int = N_STRINGS, seed: int = 0) -> tuple[str, ...]:
    """HANDWRITTEN and then n - len(HANDWRITTEN) strings mixed from FRAGMENTS (and random
    characters), the same for a seed."""
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.07:
                parts.append("".join(_random_char(rng) for _ in range(rng.randint(1, 4))))
            elif r < 0.12:  # a run of one fragment
                parts.append(rng.choice(FRAGMENTS[rng.choice(_CATEGORIES)]) * rng.randint(2, 12))
            else:
                parts.append(rng.choice(FRAGMENTS[rng.choice(_CATEGORIES)]))
            parts.append(rng.choice(_JOINERS))
        s = "".join(parts)
        if rng.random() < 0.3:
            s = s.strip(" ") if rng.random() < 0.5 else " " + s
        out.append(s)
    return tuple(out)


# -- vocabularies ---------------------------------------------------------------------------

def write_vocab_gguf(path, src_path, *, pre=None, drop=(), **meta):
    """A vocabulary-only GGUF (llama.cpp loads it with vocab_only): src's metadata, its
    tokenizer.ggml.pre set to pre, the keys in drop left out, the tokenizer.ggml.<key>
    of meta set (a bool, int, str, or a list of str, float or int)."""
    src = GGUFModelFile(src_path)
    w = gguf.GGUFWriter(str(path), src.arch)
    for key, field in src.reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        short = key.removeprefix("tokenizer.ggml.")
        if short in meta or (pre is not None and key == "tokenizer.ggml.pre"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            value = src.array(key)
            w.add_key_value(key, value if isinstance(value, list) else value.tolist(), vtype, field.types[-1])
        else:
            w.add_key_value(key, src.metadata[key], vtype)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    for short, value in meta.items():
        if isinstance(value, list):  # (tokens, scores, token types)
            item = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32,
                    int: gguf.GGUFValueType.INT32}[type(value[0])]
            w.add_key_value("tokenizer.ggml." + short, value, gguf.GGUFValueType.ARRAY, item)
            continue
        vtype = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
                 str: gguf.GGUFValueType.STRING}[type(value)]
        w.add_key_value("tokenizer.ggml." + short, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# tokenizer.ggml.pre of the models flashlm runs (Llama 3: llama-bpe; SmolLM: smollm; Qwen 2
# and 3, MoE ones too: qwen2; OLMo(E): olmo; Granite: refact; Mistral Nemo: tekken; no
# pre-tokenizer: default), and of others: the number of corpus strings each is checked on
# (fewer where llama.cpp matches with std::regex, seconds per thousand strings, or where
# another one here has the same regexes)
PRE_TYPES = {"default": N_STRINGS, "llama-bpe": N_STRINGS, "qwen2": N_STRINGS, "gpt-2": N_STRINGS,
             "smollm": N_STRINGS, "deepseek-llm": N_STRINGS, "qwen35": N_STRINGS, "tekken": N_STRINGS,
             "olmo": 1000, "refact": 1000, "starcoder": 1000, "command-r": 1000, "chatglm-bpe": 1000,
             "deepseek-coder": 2000, "deepseek-v3": 1000, "falcon": 2000, "gpt-4o": 1000, "bloom": 2000,
             "seed-coder": 1000, "bailingmoe": 1000}


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab")


class LlamaCpp:
    """llama.cpp's tokenizer, the oracle: a vocab-only model through llama-cpp-python's C
    API (buffers as large as each answer needs)."""

    def __init__(self, path):
        from flashlm.runtime.tokenizer import quiet_stderr

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with quiet_stderr():
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"llama.cpp refused {path}"
        v = self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(v)
        self.bos_id, self.eos_id = llama_cpp.llama_vocab_bos(v), llama_cpp.llama_vocab_eos(v)
        self.add_bos, self.add_eos = llama_cpp.llama_vocab_get_add_bos(v), llama_cpp.llama_vocab_get_add_eos(v)
        self.eog_ids = frozenset(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(v, i))
        self.buf = ctypes.create_string_buffer(1 << 16)

    def attr(self, token: int) -> int:
        return llama_cpp.llama_vocab_get_attr(self.vocab, token)

    def encode(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        n = 2 * len(data) + 16
        out = (llama_cpp.llama_token * n)()
        k = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, n, add_special, parse_special)
        assert k >= 0
        return list(out[:k])

    def piece(self, token: int, special: bool) -> bytes:
        k = llama_cpp.llama_token_to_piece(self.vocab, token, self.buf, len(self.buf), 0, special)
        assert k >= 0
        return self.buf.raw[:k]

    def decode(self, tokens: list[int], skip_special: bool) -> str:
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        k = llama_cpp.llama_detokenize(self.vocab, arr, len(tokens), self.buf, len(self.buf), skip_special,
                                       not skip_special)
        assert k >= 0
        return self.buf.raw[:k].decode("utf-8", errors="replace")

    def close(self):
        llama_cpp.llama_model_free(self.model)


def _pair(path):
    f = GGUFModelFile(path)
    return GGUFTokenizer(path, f.metadata, f.arch, file=f), LlamaCpp(path)


class _Oracle:
    """llama.cpp's ids, called as few times as gives every answer: with add_special they
    are [BOS] + ids + [EOS] as the vocabulary adds them (llama.cpp's tokenize, checked
    directly on every 16th text), and parse_special matters only for a text holding a
    control token's text."""

    def __init__(self, ref: LlamaCpp):
        self.ref = ref
        self.bos = [ref.bos_id] if ref.add_bos else []
        self.eos = [ref.eos_id] if ref.add_eos else []
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = {ref.piece(i, True).decode("utf-8", "replace") for i in range(ref.n_vocab) if ref.attr(i) & control}
        self.control = re.compile("|".join(re.escape(t) for t in texts if t))

    def encode_all(self, i: int, text: str) -> dict:
        encode = self.ref.encode
        parsed = encode(text, False, True)
        plain = encode(text, False, False) if self.control.search(text) else parsed
        out = {}
        for parse, ids in ((True, parsed), (False, plain)):
            out[False, parse] = ids
            out[True, parse] = encode(text, True, parse) if i % 16 == 0 else self.bos + ids + self.eos
        return out


def _mismatches(ours, ref, texts, limit=5):
    """The first `limit` differences between the two tokenizers over texts: ids for the
    four (add_special, parse_special), and the detokenized text both ways."""
    oracle, bad = _Oracle(ref), []
    for i, text in enumerate(texts):
        want = oracle.encode_all(i, text)
        for (add, parse), b in want.items():
            a = ours.encode(text, add, parse)
            if a != b:
                bad.append((text, f"encode add_special={add} parse_special={parse}", a, b))
        ids = want[False, True]
        for skip in (True, False):
            a, b = ours.decode(ids, skip), ref.decode(ids, skip)
            if a != b:
                bad.append((text, f"decode skip_special={skip}", a, b))
        if len(bad) >= limit:
            break
    return bad


def _check_vocab(path, n=N_STRINGS, pieces=False, pair=None):
    """GGUFTokenizer and llama.cpp agree on path's vocabulary (or pair's, a (GGUFTokenizer,
    LlamaCpp)): the special tokens, n corpus strings (ids, text), every token's piece
    where pieces."""
    ours, ref = pair or _pair(path)
    try:
        assert (ours.n_vocab, ours.bos_id, ours.eos_id, ours.add_bos) == (ref.n_vocab, ref.bos_id, ref.eos_id,
                                                                          ref.add_bos)
        assert ours.eog_ids == ref.eog_ids
        texts = list(corpus(n))
        bad = _mismatches(ours, ref, texts)
        assert not bad, "\n".join(f"{t!r}: {what}: ours {a!r} llama.cpp {b!r}" for t, what, a, b in bad)
        if not ours._clean_spaces and not ours._add_space_prefix:
            # text comes back whole (as in llama.cpp, where detokenize neither drops spaces
            # before punctuation nor a leading space), special tokens' texts unread, but a
            # SentencePiece vocabulary's "▁", which it reads as a space, as llama.cpp does
            missing = _missing_bytes(ours)
            wrong = [t for t in texts if ours.decode(ours.encode(t, False, False)) != t
                     and not (ours._spm and "▁" in t) and not missing.intersection(t.encode())]
            assert not wrong, f"{len(wrong)} texts do not round-trip, such as {wrong[:3]!r}"
        if pieces:
            wrong = [(i, s) for i in range(ours.n_vocab) for s in (False, True) if ours.piece(i, s) != ref.piece(i, s)]
            assert not wrong, f"{len(wrong)} pieces differ, such as {wrong[:5]}"
    finally:
        if pair is None:
            ours.close()
            ref.close()


def _missing_bytes(ours) -> set[int]:
    """The bytes a byte-level vocabulary has no token for (llama.cpp drops them)."""
    if ours._spm:
        return set()
    from flashlm.runtime.gguf_tokenizer import _BYTE_CHARS

    return {b for b, c in enumerate(_BYTE_CHARS) if ours._tok.token_to_id(c) in (None, ours._unk)}


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path):
    return _pair(smollm2_path)


@pytest.fixture(scope="module")
def gemma3_pair(gemma3_path):
    return _pair(gemma3_path)


def test_smollm2(smollm2_path, smollm2_pair):
    _check_vocab(smollm2_path, pieces=True, pair=smollm2_pair)


def test_gemma3(gemma3_path, gemma3_pair):
    _check_vocab(gemma3_path, pieces=True, pair=gemma3_pair)


# the pre types the synthetic architectures' vocabularies use (llama, qwen2/qwen3 and the
# mixtures' GGUFs copy SmolLM2's, "smollm") run in CI; the rest, which share their
# regexes with these or run llama.cpp's slow std::regex, with -m slow
IN_CI = {"default", "llama-bpe", "qwen2", "gpt-2", "smollm", "deepseek-llm"}


@pytest.mark.parametrize("pre", [p if p in IN_CI else pytest.param(p, marks=pytest.mark.slow) for p in PRE_TYPES])
def test_pre_tokenizers(pre, smollm2_path, vocab_dir):
    """SmolLM2's vocabulary under each pre-tokenizer (its regexes, flags, BOS)."""
    _check_vocab(write_vocab_gguf(vocab_dir / f"{pre}.gguf", smollm2_path, pre=pre), n=PRE_TYPES[pre])


def test_bos_eos_space_prefix_and_no_pre(smollm2_path, vocab_dir):
    """A byte-level vocabulary that adds BOS and EOS and asks for a space prefix (which
    llama.cpp's detokenize strips), with no tokenizer.ggml.pre (llama.cpp: "default")."""
    path = write_vocab_gguf(vocab_dir / "bos-eos.gguf", smollm2_path, drop=("tokenizer.ggml.pre",),
                            add_bos_token=True, add_eos_token=True, add_space_prefix=True)
    _check_vocab(path, n=1500)


def test_overlapping_special_tokens(smollm2_path, vocab_dir):
    """Special tokens that overlap in a text ("the" and "here" in "there"; "Hel" and "ello"
    in "Hello"): llama.cpp cuts the longer first, `tokenizers` the leftmost, so these
    vocabularies take llama.cpp's cut (in Python)."""
    f = GGUFModelFile(smollm2_path)
    tokens = f.array("tokenizer.ggml.tokens")
    types = f.array("tokenizer.ggml.token_type").copy()
    for text, kind in (("the", 4), ("here", 3), ("Hel", 3), ("ello", 4)):
        types[tokens.index(text)] = kind
    path = write_vocab_gguf(vocab_dir / "overlap.gguf", smollm2_path, token_type=types.tolist())
    texts = ["there", "Hello", "the here there", "Hello ello Hel", "<|im_start|>there<|im_end|>Hello"]
    _check_vocab_texts(path, [*texts, *corpus(1500)], lambda ours: ours._cut)


def _check_vocab_texts(path, texts, expect=None):
    """The two tokenizers agree on texts; expect(GGUFTokenizer) holds (the path tested)."""
    ours, ref = _pair(path)
    try:
        assert expect is None or expect(ours)
        bad = _mismatches(ours, ref, texts)
        assert not bad, "\n".join(f"{t!r}: {what}: ours {a!r} llama.cpp {b!r}" for t, what, a, b in bad)
    finally:
        ours.close()
        ref.close()


def test_small_sentencepiece(smollm2_path, vocab_dir):
    """A small SentencePiece vocabulary made up here: tokens whose characters are no token
    ("é" only in "éa", "aé", "▁é"; llama.cpp merges them all the same), a user-defined
    and a control token, everything else in bytes."""
    pieces = ["▁", "a", "b", "c", "x", "y", "ab", "bc", "abc", "▁a", "▁ab", "▁b", "aa", "aaa", "ca", "xy", "yx",
              "xyx", "éa", "aé", "▁é", "▁éa", "é▁", "<u>", "<c>", "▁▁", "▁▁▁", "cab", "bca"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [4 if p == "<u>" else 3 if p == "<c>" else 1 for p in pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    path = write_vocab_gguf(vocab_dir / "small-spm.gguf", smollm2_path, drop=("tokenizer.ggml.merges",),
                            model="llama", pre="default", tokens=tokens, token_type=types, scores=scores,
                            bos_token_id=1, eos_token_id=2, unknown_token_id=0, padding_token_id=0)
    rng = random.Random(1)
    texts = ["".join(rng.choice("abcxyé <>u▁\n") for _ in range(rng.randint(1, 24))) for _ in range(3000)]
    _check_vocab_texts(path, [*texts, *corpus(1000)], lambda ours: ours._extra)  # ("é")


def test_gemma3_space_prefix(gemma3_path, vocab_dir):
    """Gemma's SentencePiece vocabulary as Llama 2's are: a space prefixed to the text
    (and to the text after each special token), no BOS, an EOS."""
    path = write_vocab_gguf(vocab_dir / "gemma-prefix.gguf", gemma3_path, add_space_prefix=True,
                            add_bos_token=False, add_eos_token=True)
    _check_vocab(path)


@pytest.mark.parametrize("meta", [{"pre": "kimi-k2"}, {"pre": "no-such-pre"}, {"model": "bert"}, {"model": "t5"}],
                         ids=["kimi-k2", "unknown-pre", "bert", "t5"])
def test_unsupported_vocabulary(smollm2_path, meta):
    f = GGUFModelFile(smollm2_path)
    md = dict(f.metadata)
    md.update({"tokenizer.ggml." + k: v for k, v in meta.items()})
    with pytest.raises(ModelFormatError, match="|".join(meta.values())) as e:
        GGUFTokenizer(smollm2_path, md, f.arch)
    assert "\n" not in str(e.value)


def test_pieces_are_bytes(smollm2_pair, gemma3_pair):
    """Pieces are raw bytes: a character split over tokens (byte-level BPE; byte fallback)
    comes back only when they are joined."""
    for (ours, _), text in ((smollm2_pair, "日本語 🙂 \U0001fae8"), (gemma3_pair, "\U0001d11e\U000f0000 ⛰")):
        ids = ours.encode(text, False)
        pieces = [ours.piece(i) for i in ids]
        assert b"".join(pieces) == text.encode()
        assert any(len(p) and not _utf8(p) for p in pieces)
    assert ours.piece(ours.encode("\U000f0000", False)[0]) == b"\xf3"  # <0xF3>


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_closed_and_bad_input(smollm2_path):
    from flashlm.errors import FlashLMError, InvalidArgumentError

    f = GGUFModelFile(smollm2_path)
    ours = GGUFTokenizer(smollm2_path, f.metadata, f.arch, file=f)
    with pytest.raises(InvalidArgumentError):
        ours.encode("\ud800")
    with pytest.raises(InvalidArgumentError):
        ours.decode([ours.n_vocab])
    assert ours.piece(-1) == b"" and ours.piece(ours.n_vocab) == b""
    ours.close()
    with pytest.raises(FlashLMError, match="closed"):
        ours.encode("hi")


def test_threads_keep_parse_special_apart(smollm2_pair):
    """encode's parse_special is per call, with calls from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    ours, _ = smollm2_pair
    text = "<|im_start|>user hi<|im_end|>" * 20
    want = {p: ours.encode(text, False, p) for p in (True, False)}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: (i % 2 == 0, ours.encode(text, False, i % 2 == 0)), range(400)))
    assert all(ids == want[p] for p, ids in got)


def test_llguidance_reads_it(smollm2_pair):
    """llguidance takes the `tokenizers` object's JSON (as constrain.py gives it) and sees
    every token's bytes as its piece, the control tokens as special."""
    llguidance = pytest.importorskip("llguidance")

    ours, ref = smollm2_pair
    llt = llguidance.LLTokenizer(ours._tok.to_str(), n_vocab=ours.n_vocab, eos_token=sorted(ours.eog_ids))
    assert llt.vocab_size == ours.n_vocab
    assert all(llt.decode_bytes([i]) == ours.piece(i, special=True) for i in range(ours.n_vocab))
    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert all(llt.is_special_token(i) == bool(ref.attr(i) & control) for i in range(ours.n_vocab))


def test_construction_time(smollm2_path):
    """Building the tokenizer from a 49k vocabulary takes a fraction of a second."""
    f = GGUFModelFile(smollm2_path)
    t = time.perf_counter()
    GGUFTokenizer(smollm2_path, f.metadata, f.arch, file=f)
    assert time.perf_counter() - t < 2.0
