"""A GGUF file's tokenizer, built with Hugging Face `tokenizers` from the file's own
vocabulary (tokenizer.ggml.*), giving llama.cpp's token ids, pieces and text without
llama.cpp (llama-cpp-python 0.3.36's llama.cpp: src/llama-vocab.cpp, src/unicode.cpp).

- Special tokens (CONTROL, USER_DEFINED and UNKNOWN types; control ones only when
  parse_special) are cut out of the text first. llama.cpp takes them longest first,
  each everywhere in the text; `tokenizers` cuts its added tokens leftmost-longest. The
  two agree unless two special tokens can overlap in a text, the later one at least as
  long (a proper suffix of one a prefix of the other), and are not both runs of one
  character: such a vocabulary gets llama.cpp's cut, in Python (_partition).
- gpt2 (byte-level BPE): each piece split with llama.cpp's regexes for the file's
  tokenizer.ggml.pre (a Split per regex, in order, as llama.cpp applies them), its
  bytes mapped to GPT-2's characters (ByteLevel), then BPE with the file's merges
  (ignore_merges where llama.cpp sets it). The regexes' Unicode categories are limited
  to the codepoints llama.cpp's tables (Unicode 15.1) assign, Oniguruma's being newer;
  the ones llama.cpp runs as std::wregex never match non-ASCII spaces in a class.
- llama (SentencePiece BPE): spaces become U+2581 "▁" (one prepended with
  add_space_prefix), then the whole piece is merged pair by pair, always the pair whose
  concatenation is the token with the highest score (the leftmost of equals). That is
  BPE with a merge for every way of splitting a token in two tokens, ranked by the
  joined token's score; a character without a token falls back to its bytes' <0xXX>.
  (Where two different tokens tie in score, `tokenizers` ranks one first wherever they
  are, llama.cpp takes the leftmost pair: the one way the two can differ. Gemma 3's,
  Llama 2's and Baichuan's vocabularies tie only in tokens no text reaches or in runs
  of "▁", and gave llama.cpp's ids on every text tried.)
- A character no token spells stays in llama.cpp's merging as a symbol of its own; a
  text holding one is encoded with a second object (built the first time) that has an
  id past the vocabulary for it, taken out (byte-level BPE: llama.cpp drops it) or
  replaced by its bytes' tokens (SentencePiece) after.
- Pieces (token_to_piece) and detokenize are llama.cpp's own rules, on the token
  strings: raw text for control and user-defined tokens, GPT-2's characters back to
  bytes (byte-level BPE), "▁" back to spaces (SentencePiece), one byte for <0xXX>,
  nothing for unused and undefined tokens; detokenize's clean-up of spaces before
  punctuation for the pre-tokenizers that ask for it.

An unknown tokenizer.ggml.model or tokenizer.ggml.pre is a ModelFormatError.
"""

from __future__ import annotations

import bisect
import ctypes
import re
import sys
import threading
from pathlib import Path

import numpy as np

from ..errors import FlashLMError, InvalidArgumentError, ModelFormatError

# llama_token_attr bits (llama.h)
_UNKNOWN, _UNUSED, _NORMAL, _CONTROL, _USER, _BYTE = 1, 2, 4, 8, 16, 32
# GGUF token types (llama_token_type) -> attributes; any other number is UNDEFINED (0)
CONTROL, USER_DEFINED = _CONTROL, _USER  # llama.cpp's token attributes (llama_token_attr), for constrain
_TYPE_ATTR = np.array([0, _NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE], np.int32)

SPACE = "\u2581"  # SentencePiece's escaped space

# -- llama.cpp's pre-tokenizer regexes (llm_tokenizer_bpe), applied in order ----------------

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN35 = (_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*"
           "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_DEEPSEEK3 = ["\\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+",
              ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
               "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")]
_UPPER_LOWER = ("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+{c}"
                "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*{c}")
_DEEPSEEK_LETTERS = ("\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-"
                      "\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
                      "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
                      "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
                      "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-"
                      "\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
                      "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
                      "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
                      "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
                      "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
                      "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
                      "\U000118a0-\U000118df\U0001e900-\U0001e943]+")
_BLOOM = " ?[^(\\s|.,!?…。，、।۔،)]+"

_UNASSIGNED = (  # llama.cpp's unassigned codepoints (Unicode 15.1), zlib+base85 of hex "gap length" pairs
    "c-nPWiIwFj5KDy+%njk-EB_EyQWfr=-JR$8ZW}`#DwSYzA0dSnO6VclRd^dW?y2EhPQ2kQ_b@^{F|~y=#N*-E#nm-DA)lOvHR0uYj?>y1YKR=6"
    "ljp(%{qc$oFXlAEW(w0k6uQw!#A4j12hcS5Yi0U==B)aJtm!={6V8lbX=ut>{L=z`EdP)-^2*MI8QsVK6ZBrVgU%Suzk{aDq@XRD;<lp}XOA+&"
    "OTmIY$5uq(87qeG9j|aY<S+WvuF2T}C`zJRfZvk!MfrPG)0*<7eSLm%_6I^Oe{mxdRfFLm(q(s(&9fSKTFUDRdC|ZfQvH&yqSYoD<EZ{(kt&BH"
    "6i!KnFWsJ^7$sX*`%J-XpPt61uByKWQ~aN=w3PRZLh#@+Gs_lgb8OPQF;=I+IT`h2Tm0Zea@0ovHvP;1S0pmNa8$Hsc`p$W&X$r!qiAHQk5G9U"
    "DvA+FV#rK#6eiG8h2bPx>+B8mTt*_95Aw$~!yKphC9xkq$oKWKM%7_`Gz+8In~dPJs>l<&oycc``PywT_B1=&@+3=pECwTt)SEHfzlxNHDEAnM"
    "-K+iAAHs3Y0Zia6WGii3bvo@cs7m#zg#hwvPmN(hq7Z+*Sgms)_3I3OFmO<(vhdCPjzVD)-a1XihdumAwu%u*7Om29PX=FFpZxceRVFlj(;}UV"
    "rH_=MEW)KGv=?jB$sk6wc5D37vwpMr;z>H>W_ojwKFvBbTH_Th9DPeIqyLG^1jb@pLV@Zle=)nGSET{u{gen577x@PUiL`Zr6-I;Zf553GXKK9"
    "oW!dd?;=4<)Zd43&JToQb8#cwnJ8aQy)C2XAMa?&Xk}y@3<6GmrX_Bc>gpBQMA12$OzjF?OcBCH*$<qc2tzqo^Ag0@oP5UE`X;dPnJUVfVmd+Z"
    "YT(H_WSeB>R<JLf^emG^L2Yi{x*($hpwPDYEthKKcM`FoA+eitMA%5bV4s6qisV`QUpK~9)8WCWW@v}))+fhQDJaR0*cqr)lgxmZY5L!GGE?B>"
    "Ta#@<Rjo^z2TZVW+04g)USTz&Vp5Y>np0kG!k<kU@jaf>UFCO9Hc10<xk(Hs{O~A@L?Y_MTJ>fkmJ~Q1Jm|I(<YJJ#QfCvKhiFNvj-B0O^SrMv"
    "E3;mv;%~+*V{Y`cX*V+LX$ObM9VN3wwFy%&2W}>S#rju}fYT^eL1qdL6W;|m3*d`LIc3>;1u}AvdT7iy2_<b8YafRs3&`U<LOrR)g=&;N9?()-"
    "2qm?@(lDqbdk#f-?98)sjw#z|?DncYcDRCu&jTCxsUt=XhNcRUP-P)5HbNCquUGpzxo{<hhj9C{4N<qMcAZqBsz&SInQWivqKS{kR`zy0cFvbm"
    "w)%O{fY5m;X?uaVy}>rE!u{Y?_3mmjqi^%Z<*F@J&JGhalOvfcT8tHWnYUZYnjX{H@+l)i*4A;50OgW0NI6)9!jXIv5FIkljkw>Jo3g9@@fN>B"
    "#LxVHU;EpxX8C1dS;kdHs=Z|8h9kL-7L8ST{kZcQzd^8v`UfuDHf#FMj3z>(-jYT}M!-6WR0;CsQo_G^c;86OMc<_TveF@6H=EL<z=s$&T~Vk1"
    "FGA6j1FUL~L^d9hi(9;FL)^Z#*Ko_6i-$REH4nb#BK18We(S!}O8A7gafBED9@Oi7Us|$1{{VZlYAO")


def _unassigned_class() -> str:
    """The codepoints llama.cpp's Unicode tables (src/unicode-data.cpp, Unicode 15.1) have
    unassigned, as an Oniguruma class body: `tokenizers`' Oniguruma knows a newer Unicode,
    whose letters, digits, marks and symbols among them llama.cpp sees as none of those."""
    import base64
    import zlib

    values = [int(v, 16) for v in zlib.decompress(base64.b85decode(_UNASSIGNED)).decode().split()]
    out, pos = [], 0
    for gap, length in zip(values[::2], values[1::2]):
        first, pos = pos + gap, pos + gap + length
        out.append(f"\\x{{{first:X}}}" + (f"-\\x{{{pos - 1:X}}}" if length > 1 else ""))
    return "".join(out)


_WIDE_SPACES = "\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"


def _as_llama_cpp(regex: str, unassigned: str) -> str:
    """regex as llama.cpp matches it. One with Unicode categories: each \\p{X} limited to
    llama.cpp's assigned codepoints. One without (llama.cpp's std::wregex, on text whose
    non-ASCII spaces it turned into \\v): its classes of characters never hold those."""
    if "\\p{" in regex:
        return re.sub(r"\\p\{(\w+)\}", lambda m: f"[\\p{{{m.group(1)}}}&&[^{unassigned}]]", regex)
    out, i = [], 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            out.append(regex[i:i + 2])
            i += 2
            continue
        if c == "[":  # (no nested classes in ECMAScript)
            j = i + 1
            while regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            body = regex[i + 1:j]
            if body.startswith("^") or body.isascii():  # (llama.cpp's negated ones hold \\s)
                out.append(regex[i:j + 1])
            else:
                out.append(f"[{body}&&[^{_WIDE_SPACES}]]")
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


_REGEXES = {
    "default": ["[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "gpt2": [_GPT2],
    "starcoder": ["\\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "falcon": ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     "\\s+$", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "\\p{N}+"],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", "\\p{N}"],
    "deepseek-v3": _DEEPSEEK3,
    "bloom": [_BLOOM],
    "viking": [_BLOOM, "\\p{N}"],
    "tekken": [_UPPER_LOWER.replace("{c}", "")
               + "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "gpt-4o": [_UPPER_LOWER.replace("{c}", _CONTRACTIONS + "?")
               + "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "bailingmoe": [("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
                    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+")],
    "seed-coder": [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+"
                   "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "ufakzeka": ["[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "laguna": ["[^\\n]+|[\\n]+", _QWEN2],
}

# tokenizer.ggml.pre -> (regexes, flags llama.cpp sets for it). Flags: "keep_spaces"
# (clean_spaces off in detokenize), "ignore_merges" (a pre-split word that is a token
# stays whole), "add_bos" (the default before tokenizer.ggml.add_bos_token), "no_bos"
# (no BOS token unless the file names one).
_PRE: dict[str, tuple[str, frozenset]] = {}


def _pre(names: str, regexes: str, *flags: str) -> None:
    for name in names.split():
        _PRE[name] = (regexes, frozenset(flags))


_pre("default", "default")
_pre("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
     "ignore_merges", "add_bos")
_pre("dbrx smaug-bpe", "llama3")
_pre("chatglm-bpe", "llama3", "no_bos")
_pre("glm4 glm5", "llama3", "no_bos", "ignore_merges")
_pre("deepseek-llm", "deepseek-llm", "keep_spaces")
_pre("deepseek-coder", "deepseek-coder", "keep_spaces")
_pre("deepseek-v3 hunyuan-dense joyai-llm hy_v4", "deepseek-v3", "keep_spaces")
_pre("falcon", "falcon")
_pre("gpt-2 phi-2 mpt olmo jais exaone4 a.x-4.0 mellum gigachat", "gpt2")
_pre("trillion granite-docling", "gpt2", "keep_spaces")
_pre("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder")
_pre("smollm command-r", "starcoder", "keep_spaces")
_pre("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan grok-2 solar-open", "qwen2", "keep_spaces")
_pre("stablelm2 megrez", "qwen2")
_pre("qwen35", "qwen35", "keep_spaces")
_pre("bloom gpt3-finnish", "bloom")
_pre("poro-chat", "bloom", "keep_spaces")
_pre("viking", "viking", "keep_spaces")
_pre("tekken", "tekken", "keep_spaces", "ignore_merges", "add_bos")
_pre("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt-4o", "keep_spaces")
_pre("bailingmoe bailingmoe2 llada-moe", "bailingmoe", "keep_spaces")
_pre("seed-coder", "seed-coder", "keep_spaces")
_pre("ufakzeka", "ufakzeka", "keep_spaces")
_pre("laguna", "laguna", "keep_spaces")

# Token texts llama.cpp treats as ends of generation (and makes control tokens), and the
# ones it looks for as the FIM tokens (pad, repo and file-separator ones end generation)
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["])
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
# metadata key (tokenizer.ggml.<key>) -> special token, in llama.cpp's order
_ID_KEYS = (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("eot_token_id", "eot"), ("eom_token_id", "eom"),
            ("unknown_token_id", "unk"), ("seperator_token_id", "sep"), ("padding_token_id", "pad"),
            ("mask_token_id", "mask"), ("fim_pre_token_id", "fim_pre"), ("fim_suf_token_id", "fim_suf"),
            ("fim_mid_token_id", "fim_mid"), ("fim_pad_token_id", "fim_pad"), ("fim_rep_token_id", "fim_rep"),
            ("fim_sep_token_id", "fim_sep"), ("prefix_token_id", "fim_pre"), ("suffix_token_id", "fim_suf"),
            ("middle_token_id", "fim_mid"))

_REMEDY = "load the model's Hugging Face folder (its tokenizer.json) instead"
_UNK = "\x00<flashlm: a character without a token>\x00"


def _byte_chars() -> list[str]:
    """GPT-2's byte -> character map (bytes_to_unicode), as llama.cpp's unicode.cpp has it."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
_CHAR_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
_FROM_BYTE_CHARS = str.maketrans({c: chr(b) for b, c in enumerate(_BYTE_CHARS)})
_NOT_BYTE_CHAR = re.compile("[^" + "".join(re.escape(c) for c in _BYTE_CHARS) + "]")
_CLEAN_1 = re.compile(rb" (?=[?!.,])")
_CLEAN_3 = re.compile(rb" (?='[sm]|'re|'ve)")


class GGUFTokenizer:
    """llama.cpp's tokenizer for a GGUF file, rebuilt with `tokenizers` (see the module's
    docstring): the interface of tokenizer.LlamaCppTokenizer, and `_tok`, the
    `tokenizers.Tokenizer` (its added tokens are the special ones, `special` for control
    and unknown tokens)."""

    def __init__(self, path: str | Path, metadata: dict, arch: str, file=None):
        from . import tokenizer as shared  # (tokenizer.py imports this module)

        self._utf8, self._ids_within = shared._utf8, shared._ids_within
        md = metadata
        kind = md.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ModelFormatError(f"{path}: tokenizer.ggml.model {kind!r} is not a vocabulary flashlm's tokenizer"
                                   f" reads (gpt2, llama); {_REMEDY}")
        self._spm = kind == "llama"
        pre = md.get("tokenizer.ggml.pre") or "default"
        if not self._spm and pre not in _PRE:
            raise ModelFormatError(f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer flashlm's tokenizer"
                                   f" knows; {_REMEDY}")
        name = str(md.get("general.name", "")).lower()
        if any(s in name for s in ("phi-3", "phi3", "modern-bert")) or arch in ("nomic-bert-moe", "jina-bert-v3"):
            # llama.cpp strips the spaces around some special tokens of these (by name)
            raise ModelFormatError(f"{path}: this model's tokenizer (spaces stripped around special tokens) is not"
                                   f" one flashlm's tokenizer reads; {_REMEDY}")
        regexes, flags = _PRE[pre] if not self._spm else (None, frozenset())

        if file is None:
            from ..formats.modelfile import GGUFModelFile

            file = GGUFModelFile(path)
        tokens = _strings(file, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFormatError(f"{path}: no tokenizer.ggml.tokens; the file is not a complete model")
        n = self.n_vocab = len(tokens)
        for i in [i for i, t in enumerate(tokens) if not t] if "" in tokens else ():
            tokens[i] = f"[EMPTY_{i}]"  # as llama.cpp names an empty token
        types = _numbers(file, "tokenizer.ggml.token_type", n)
        if types is None:
            attr = np.full(n, _NORMAL, np.int32)
        else:
            attr = np.where((types >= 0) & (types < len(_TYPE_ATTR)), _TYPE_ATTR[np.clip(types, 0, 6)], 0)
            attr = attr.astype(np.int32)
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            raise ModelFormatError(f"{path}: tokenizer.ggml.tokens repeats a token; download or convert it again")

        ids = self._special_ids(md, n, pre)
        self._find_special_texts(vocab, attr, ids)
        eog = self._eog(vocab, attr, ids, tokens)

        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        add_bos = self._spm or "add_bos" in flags
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_bos = add_bos
        self._add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        self._add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", self._spm))
        self._clean_spaces = not self._spm and "keep_spaces" not in flags
        self.eog_ids = frozenset(eog)
        self._attr = attr
        self._hidden = bytes((attr & (_CONTROL | _UNKNOWN)) != 0)  # no piece unless special
        self._pieces: list[bytes | None] = [None] * n

        specials = np.nonzero(attr & (_CONTROL | _USER | _UNKNOWN))[0].tolist()
        self._lock = threading.Lock()
        self._closed = False
        self._unk = -1
        self._extra: dict[int, list[int]] = {}
        self._trigger = self._exact = self._make_exact = None
        self._build_lock = threading.Lock()
        self._build(file, tokens, vocab, attr, specials, regexes, flags, path)
        del vocab
        _release_free_memory()
        self._cut = _needs_own_cut([tokens[i] for i in specials])
        if self._cut:  # llama.cpp's order: longest first (ties: lower id first)
            self._cut_order = sorted(((tokens[i], i, bool(attr[i] & (_CONTROL | _UNKNOWN))) for i in specials),
                                     key=lambda x: -len(x[0]))

        own = md.get("tokenizer.chat_template")
        self.template = shared.ChatTemplate(own or shared.FALLBACK_TEMPLATES.get(arch, shared.CHATML_TEMPLATE),
                                            self.piece(self.bos_id, special=True).decode("utf-8", "replace"),
                                            self.piece(self.eos_id, special=True).decode("utf-8", "replace"),
                                            own=bool(own))

    # -- llama.cpp's special tokens --------------------------------------------------------

    def _special_ids(self, md: dict, n: int, pre: str) -> dict:
        null = -1
        if self._spm:
            ids = {"bos": 1, "eos": 2, "unk": 0}
        else:
            ids = {"bos": 11, "eos": 11, "unk": null}
            if pre in ("chatglm-bpe", "glm4", "glm5"):
                ids["bos"] = null
        for key, name in _ID_KEYS:
            i = ids.setdefault(name, null)
            if i >= n:
                ids[name] = null
        for key, name in _ID_KEYS:
            v = md.get("tokenizer.ggml." + key)
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < n:
                ids[name] = int(v)
        return ids

    @staticmethod
    def _find_special_texts(vocab: dict, attr: np.ndarray, ids: dict) -> None:
        """The EOT, EOM and FIM tokens llama.cpp finds by their text where the file names
        none, each made a control token. (Where a vocabulary has two candidates, llama.cpp
        takes whichever its hash map yields first; here, the lowest id.)"""
        for name, texts in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",)), *_FIM_TEXTS.items()):
            if ids[name] != -1:
                continue
            found = sorted(vocab[t] for t in texts if t in vocab)
            if found:
                ids[name] = found[0]
                attr[found[0]] |= _CONTROL

    @staticmethod
    def _eog(vocab: dict, attr: np.ndarray, ids: dict, tokens: list[str]) -> set:
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] != -1}
        for t in _EOG_TEXTS:
            i = vocab.get(t)
            if i is not None:
                eog.add(i)
                attr[i] |= _CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
            if t in vocab:
                attr[vocab[t]] = _USER
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] != -1}
        texts = {tokens[i]: i for i in eog}
        if "<|end|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts) and (
                "<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])
            attr[texts["<|end|>"]] = _USER
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            attr[texts["</s>"]] = _NORMAL
        return eog

    # -- the `tokenizers` object -----------------------------------------------------------

    def _build(self, file, tokens, vocab, attr, specials, regexes, flags, path):
        """The `tokenizers` object (self._tok), and where llama.cpp keeps characters with no
        token in the merging (a character that no token is, in byte-level BPE; one that
        only other tokens hold, in SentencePiece), what a text holding one is encoded with
        instead: an object with ids past the vocabulary for them (taken out of, or
        replaced in, encode's ids), built the first time such a text comes."""
        from tokenizers import models

        n, extra, unk = len(tokens), {}, {}
        try:
            if self._spm:
                scores = _numbers(file, "tokenizer.ggml.scores", n)
                scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)
                merges, chars = _spm_merges(tokens, scores)
                if chars:  # (llama.cpp gives the bytes of one left alone)
                    byte_ids = [vocab.get(f"<0x{b:02X}>", vocab.get(chr(b))) for b in range(256)]
                    self._extra = {n + i: [byte_ids[b] for b in c.encode()] for i, c in enumerate(chars)}
                    if None in (i for ids in self._extra.values() for i in ids):
                        raise ModelFormatError(f"{path}: the vocabulary has no token for some byte; {_REMEDY}")
                    extra = {c: n + i for i, c in enumerate(chars)}
                    self._trigger = re.compile(b"|".join(re.escape(c.encode()) for c in chars))

                def model(more=None):
                    pairs = merges if more or not extra else [p for p in merges if extra.keys().isdisjoint(p)]
                    return models.BPE(vocab={**vocab, **more} if more else vocab, merges=pairs, byte_fallback=True)
            else:
                raw = _strings(file, "tokenizer.ggml.merges")
                if raw is None:
                    raise ModelFormatError(f"{path}: no tokenizer.ggml.merges in a BPE vocabulary; download or"
                                           f" convert it again")
                merges = _bpe_merges(raw, vocab, path)
                missing = bytes(b for b, c in enumerate(_BYTE_CHARS) if c not in vocab)
                if missing:  # (dropped by llama.cpp after the merges; an unknown token until then)
                    self._unk = n
                    extra = {_UNK: n}
                    unk = {"unk_token": _UNK, "fuse_unk": False}
                    self._trigger = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]")

                def model(more=None):
                    return models.BPE(vocab={**vocab, **more} if more else vocab, merges=merges,
                                      ignore_merges="ignore_merges" in flags, **(unk if more else {}))

            self._hf = self._wrap(model(), tokens, attr, specials, regexes)
        except ModelFormatError:
            raise
        except Exception as e:  # tokenizers' own refusal
            raise ModelFormatError(f"{path}: `tokenizers` refused the vocabulary ({str(e)[:200]}); {_REMEDY}") from e
        if extra:
            self._make_exact = lambda: self._wrap(model(extra), tokens, attr, specials, regexes)

    def _wrap(self, model, tokens, attr, specials, regexes):
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            normalizers,
            pre_tokenizers,
            processors,
        )

        tok = Tokenizer(model)
        if self._spm:
            steps = [normalizers.Prepend(SPACE)] if self._add_space_prefix else []
            tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
            dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
            if self._add_space_prefix:
                dec.append(decoders.Strip(" ", 1, 0))
            tok.decoder = decoders.Sequence(dec)
        else:
            unassigned = _unassigned_class()
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_as_llama_cpp(r, unassigned)), behavior="isolated")
                 for r in _REGEXES[regexes]]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.decoder = decoders.ByteLevel()
        control = attr & (_CONTROL | _UNKNOWN)
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials if control[i]])
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in specials if not control[i]])
        single = ([tokens[self.bos_id]] if self.add_bos and self.bos_id >= 0 else []) + ["$A"]
        single += [tokens[self.eos_id]] if self._add_eos and self.eos_id >= 0 else []
        if len(single) > 1:  # (what encode's add_special adds)
            ids = {tokens[i]: i for i in (self.bos_id, self.eos_id) if i >= 0}
            tok.post_processor = processors.TemplateProcessing(
                single=single, pair=single + ["$B" if s == "$A" else s for s in single],
                special_tokens=[(t, ids[t]) for t in dict.fromkeys(single) if t != "$A"])
        return tok

    def _exact_tok(self):
        with self._build_lock:
            if self._exact is None:
                self._exact = self._make_exact()
            return self._exact

    # -- the interface ---------------------------------------------------------------------

    @property
    def _tok(self):
        """The `tokenizers.Tokenizer` (constrain.py gives its JSON to llguidance)."""
        return self._open()

    def _open(self):
        if self._closed:
            raise FlashLMError("the model is closed; load it again to use its tokenizer")
        return self._hf

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, llama.cpp's llama_tokenize's; add_special adds BOS (and
        EOS) where the model wants them, parse_special reads control tokens' texts as
        those tokens (user-defined ones always are)."""
        data = self._utf8(text)
        tok = self._open()
        if self._trigger is not None and self._trigger.search(data):
            tok = self._exact_tok()
        with self._lock:  # (encode_special_tokens is the Tokenizer's: one setting at a time)
            tok.encode_special_tokens = self._cut or not parse_special
            try:
                if self._cut:
                    ids = self._encode_cut(tok, text, parse_special)
                else:
                    ids = tok.encode(text, add_special_tokens=False).ids
            finally:
                tok.encode_special_tokens = False
        if self._unk >= 0 and self._unk in ids:
            ids = [i for i in ids if i != self._unk]
        if self._extra and ids and max(ids) >= self.n_vocab:
            ids = [j for i in ids for j in self._extra.get(i, (i,))]
        if add_special:
            if self.add_bos and self.bos_id >= 0:
                ids.insert(0, self.bos_id)
            if self._add_eos and self.eos_id >= 0:
                ids.append(self.eos_id)
        return ids

    def _encode_cut(self, tok, text: str, parse_special: bool) -> list[int]:
        ids = []
        for part in _partition(text, self._cut_order, parse_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(tok.encode(part, add_special_tokens=False).ids)
        return ids

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of token, llama.cpp's llama_token_to_piece's (b"" for an id outside
        the vocabulary, as a missing BOS's -1; control tokens only with special)."""
        if not 0 <= token < self.n_vocab:
            return b""
        self._open()
        token = int(token)
        if not special and self._hidden[token]:
            return b""
        p = self._pieces[token]
        if p is None:
            p = self._pieces[token] = self._make_piece(token)
        return p

    def _make_piece(self, token: int) -> bytes:
        attr, text = int(self._attr[token]), self._hf.id_to_token(token)
        if attr & (_CONTROL | _UNKNOWN | _USER):
            return text.encode()
        if attr & _NORMAL:
            if self._spm:
                return text.replace(SPACE, " ").encode()
            if _NOT_BYTE_CHAR.search(text) is None:
                return text.translate(_FROM_BYTE_CHARS).encode("latin-1")
            return _decode_bpe_text(text)
        if attr & _BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused, undefined

    def decode(self, tokens: list[int], skip_special: bool = True) -> str:
        """Text of `tokens`, as llama.cpp's llama_detokenize gives it (skip_special: drop a
        leading BOS and a trailing EOS the model adds, and control tokens)."""
        if not len(tokens):
            return ""
        n = self.n_vocab
        if set(map(type, tokens)) == {int}:  # (the common case, checked at C speed)
            if min(tokens) < 0 or max(tokens) >= n:
                raise InvalidArgumentError(f"token ids must be integers in [0, {n})")
        elif not self._ids_within(tokens, n):
            raise InvalidArgumentError(f"token ids must be integers in [0, {n})")
        else:
            tokens = [int(t) for t in tokens]
        self._open()
        remove_space = self._add_space_prefix
        start, end = 0, len(tokens)
        if skip_special and self.add_bos and tokens[0] == self.bos_id:
            remove_space = False
            start = 1
        if skip_special and self._add_eos and end > start and tokens[end - 1] == self.eos_id:
            end -= 1
        cache, hidden, make = self._pieces, self._hidden, self._make_piece
        pieces = []
        for t in tokens[start:end]:
            if skip_special and hidden[t]:
                pieces.append(b"")
                continue
            p = cache[t]
            if p is None:
                p = cache[t] = make(t)
            pieces.append(p)
        if remove_space and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]
        data = b"".join(pieces)
        if self._clean_spaces and b" " in data:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def close(self):
        """Free the tables (later calls refuse, as a closed LlamaCppTokenizer's do)."""
        self._closed = True
        self._hf = self._exact = self._make_exact = None
        self._pieces = []


# -- helpers ---------------------------------------------------------------------------------

def _release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc): building the merges of a
    large vocabulary allocates and frees a few hundred MB, which the heap would otherwise
    keep, counted as this process's (resident) memory."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # (not glibc)
            pass


def _strings(file, key: str) -> list[str] | None:
    """A metadata string array, decoded at once (a null byte between the strings, split
    after); the file reader's per-string decoding where a string holds a null byte."""
    field = file.reader.fields.get(key) if file.reader is not None else None
    if field is None or len(field.types) < 2 or field.types[-1].name != "STRING":
        return None
    table, raw = np.asarray(field.parts[-2], np.int64), np.asarray(field.parts[-1])
    count = len(table) - 1
    if count == 0:
        return []
    starts = table[:-1]
    buf = np.array(raw, np.uint8)  # a copy: the null bytes go in
    buf[starts + 7] = 0
    keep = np.ones(len(buf), bool)
    keep[(starts[:, None] + np.arange(7)).ravel()] = False
    joined = buf[keep].tobytes()
    if joined.count(0) == count:
        return joined.decode("utf-8", errors="replace").split("\x00")[1:]
    return file.array(key)


def _numbers(file, key: str, n: int):
    field = file.reader.fields.get(key) if file.reader is not None else None
    if field is None or len(field.types) < 2:
        return None
    a = file.array(key)
    if a is None or isinstance(a, list) or len(a) < n:
        raise ModelFormatError(f"{file.path}: {key} is not {n} numbers; download or convert the model again")
    return np.asarray(a[:n])


def _bpe_merges(merges: list[str], vocab: dict, path) -> list[tuple[str, str]]:
    """The merges as llama.cpp reads them (split at the first space after the first
    character; a repeated pair keeps its first rank). A merge of strings that are not
    tokens, or into one that is not, `tokenizers` cannot hold."""
    pairs = {}
    for m in merges:
        k = m.find(" ", 1)
        if k > 0:
            pairs.setdefault((m[:k], m[k + 1:]), None)
    bad = [p for p in pairs if p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab]
    if bad:
        raise ModelFormatError(f"{path}: tokenizer.ggml.merges has {len(bad)} merge(s) of or into strings that are"
                               f" not tokens (such as {' '.join(bad[0])!r}); {_REMEDY}")
    return list(pairs)


def _spm_merges(tokens: list[str], scores: np.ndarray) -> tuple[list[tuple[str, str]], list[str]]:
    """Every way to split a token into two tokens, as BPE merges ranked by the joined
    token's score (highest first; llama.cpp's SentencePiece merges whichever adjacent pair
    joins into the highest-scoring token), and the characters in tokens that are no token
    (but the space, which SentencePiece's text never holds), one side of a merge too.

    Found with polynomial hashes (mod 2^64) of the tokens' prefixes, one prefix length
    at a time over all tokens at once (numpy; Python string slicing took 2 s for Gemma's
    262k tokens), looked up in a hash index of the tokens."""
    n = len(tokens)
    lengths = np.fromiter(map(len, tokens), np.int64, n)
    cps = np.frombuffer("".join(tokens).encode("utf-32-le"), np.uint32)
    alone = np.zeros(0x110000, bool)
    alone[cps] = True
    alone[cps[(np.cumsum(lengths) - lengths)[lengths == 1]]] = False
    alone[0x20] = False
    extra = [chr(c) for c in np.nonzero(alone)[0].tolist()]
    if extra:
        tokens = tokens + extra
        lengths = np.concatenate([lengths, np.ones(len(extra), np.int64)])
        cps = np.concatenate([cps, np.array([ord(c) for c in extra], np.uint32)])
    starts = np.cumsum(lengths) - lengths
    longest = int(lengths.max())
    base = np.uint64(0x9E3779B97F4A7C15)
    powers = np.ones(longest + 1, np.uint64)
    with np.errstate(over="ignore"):
        np.multiply.accumulate(np.full(longest, base), out=powers[1:])
        # prefix[k] holds hash(t[:k]) of the tokens at least k long; full, hash(t)
        full = np.zeros(len(tokens), np.uint64)
        prefixes, alive = [], np.arange(len(tokens))
        h = np.zeros(len(tokens), np.uint64)
        for k in range(1, longest + 1):
            h = h * base + cps[starts[alive] + k - 1].astype(np.uint64) + np.uint64(1)
            done = lengths[alive] == k
            full[alive[done]] = h[done]
            prefixes.append((alive, h))
            alive, h = alive[~done], h[~done]
        index = _HashIndex(full, lengths)
        found = []
        for k in range(1, longest):
            tok, h = prefixes[k - 1]
            split = (tok < n) & (lengths[tok] > k)  # (the extra characters join nothing)
            tok, h = tok[split], h[split]
            left, ok = index.find(h, np.full(len(tok), k))
            tok, h, left = tok[ok], h[ok], left[ok]
            rest = lengths[tok] - k
            right, ok = index.find(full[tok] - h * powers[rest], rest)
            found.append((tok[ok], np.full(int(ok.sum()), k), left[ok], right[ok]))
    tok, k, left, right = (np.concatenate(x) for x in zip(*found)) if found else [np.zeros(0, np.int64)] * 4
    rank = np.lexsort((k, tok, -scores[tok].astype(np.float64)))
    strings = np.array(tokens, dtype=object)  # (indexed by numpy: no int objects on the way)
    return list(zip(strings[left[rank]].tolist(), strings[right[rank]].tolist())), extra


class _HashIndex:
    """Token ids by hash (of their text) and length: the hashes sorted into 2^b buckets
    by their top bits, for lookups a few array reads each (a binary search over 262k
    hashes was a third of a second for Gemma's 1.2M lookups)."""

    _MIX = np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, hashes: np.ndarray, lengths: np.ndarray):
        self.bits = max(2, len(hashes).bit_length())
        self.shift = np.uint64(64 - self.bits)
        self.order = np.argsort(self._mix(hashes), kind="stable")
        self.sorted = self._mix(hashes)[self.order]
        counts = np.bincount((self.sorted >> self.shift).astype(np.int64), minlength=1 << self.bits)
        self.starts = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=self.starts[1:])
        self.lengths = lengths

    def _mix(self, h):
        with np.errstate(over="ignore"):
            return (h ^ (h >> np.uint64(31))) * self._MIX

    def find(self, hashes: np.ndarray, lengths: np.ndarray):
        """(ids, found): the token with each hash and length, where there is one."""
        h = self._mix(hashes)
        bucket = (h >> self.shift).astype(np.int64)
        lo, hi = self.starts[bucket], self.starts[bucket + 1]
        ids = np.full(len(h), -1, np.int64)
        live, d = np.nonzero(lo < hi)[0], 0  # (most buckets are empty)
        while live.size:
            at = lo[live] + d
            hit = self.sorted[at] == h[live]
            ids[live[hit]] = self.order[at[hit]]
            live, d = live[~hit], d + 1
            live = live[lo[live] + d < hi[live]]
        found = ids >= 0
        found[found] &= self.lengths[ids[found]] == lengths[found]
        return ids, found


def _needs_own_cut(specials: list[str]) -> bool:
    """Whether `tokenizers`' leftmost-longest cut of special tokens could differ from
    llama.cpp's longest-first one: a proper suffix of one special token a prefix of
    another at least as long, the two not runs of one same character (runs cut the same
    both ways)."""
    def run(t):
        return t == t[0] * len(t)

    firsts = {t[0] for t in specials}
    ordered = sorted(specials)
    longest_other = {}  # a character -> the longest special token not a run, starting with it
    for t in specials:
        if not run(t):
            longest_other[t[0]] = max(longest_other.get(t[0], 0), len(t))
    for t in specials:
        if run(t):  # its suffixes are runs: only a token that is not a run can start with one
            if len(t) > 1 and longest_other.get(t[0], 0) >= len(t):
                return True
            continue
        for j in range(1, len(t)):
            if t[j] not in firsts:
                continue
            suffix = t[j:]
            for other in ordered[bisect.bisect_left(ordered, suffix):]:
                if not other.startswith(suffix):
                    break
                if len(other) >= len(t) and other != t:
                    return True
    return False


def _partition(text: str, order, parse_special: bool) -> list:
    """llama.cpp's tokenizer_st_partition: each special token, longest first, cut out of
    every piece of text left (its leftmost occurrences); a list of str and token ids."""
    parts = [text]
    for s, i, control in order:
        if (control and not parse_special) or s not in text:
            continue
        out = []
        for p in parts:
            if isinstance(p, int) or s not in p:
                out.append(p)
                continue
            for j, q in enumerate(p.split(s)):
                if j:
                    out.append(i)
                if q:
                    out.append(q)
        parts = out
    return parts


def _decode_bpe_text(text: str) -> bytes:
    """llama.cpp's llama_decode_text: GPT-2 characters back to bytes; another character
    becomes "[UNK_BYTE_0x<its UTF-8 bytes>" + the whole token + "]"."""
    out = bytearray()
    for c in text:
        b = _CHAR_BYTE.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


def _clean_spaces(data: bytes) -> bytes:
    """llama_detokenize's clean_spaces passes: no space before ?!., ; " ' " loses its
    spaces; no space before 's 'm 're 've."""
    data = _CLEAN_1.sub(b"", data)
    if b" ' " in data:  # the second pass, as llama.cpp writes it (in place)
        text = bytearray(data)
        n, total, i = len(text), (1 if text else 0), 1
        while i < n:
            x = text[i]
            if x == 0x27 and i + 1 < n and text[i - 1] == 0x20 and text[i + 1] == 0x20:
                total -= 1
                i += 1
                text[i] = 0
            text[total] = x
            total += 1
            i += 1
        data = bytes(text[:total])
    return _CLEAN_3.sub(b"", data)
