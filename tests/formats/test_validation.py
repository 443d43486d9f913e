"""Validate before trusting (issue 29): a file whose metadata and tensors disagree, or
that is not a model file at all, is refused with one ModelFormatError naming the field,
before anything allocates, computes or reaches llama.cpp."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

import flashlm
from flashlm.errors import ModelFormatError, UnsupportedModelError
from flashlm.formats.modelfile import GGUFModelFile
from flashlm.formats.validate import validate_flash_layout
from hf_fixture import gguf_to_hf
from tiny_models import write_tiny_gguf

U32, ARRAY = 4, 9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "bpe").read_bytes()


def set_u32(data: bytes, key: str, value: int) -> bytes:
    """data with metadata key's UINT32 value set to value."""
    pos = data.index(key.encode() + struct.pack("<I", U32)) + len(key) + 4
    return data[:pos] + struct.pack("<I", value) + data[pos + 4:]


def load(tmp_path, data: bytes, name: str = "m.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    with flashlm.load(p, n_ctx=64, n_threads=1) as m:
        return m.config, m.generate("Hi", max_tokens=2, temperature=0)


def refused(tmp_path, data: bytes, match: str, error=ModelFormatError):
    with pytest.raises(error, match=match) as e:
        load(tmp_path, data)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_the_tiny_model_loads(tmp_path, tiny):
    cfg, _ = load(tmp_path, tiny)
    assert (cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim) == (2, 2, 1, 16)


def test_a_missing_tensor_is_named(tmp_path, tiny):
    data = tiny.replace(b"output_norm.weight", b"output_norm.weighX")
    refused(tmp_path, data, "tensor output_norm.weight is missing")


def test_kv_heads_that_do_not_divide_the_heads_are_named(tmp_path, smollm2_path):
    # SmolLM2: 9 heads over 3 KV heads; 6 used to load and print garbage
    data = set_u32(smollm2_path.read_bytes(), "llama.attention.head_count_kv", 6)
    refused(tmp_path, data, "head_count_kv")


def test_kv_heads_that_do_not_match_the_tensors_are_named(tmp_path, tiny):
    data = set_u32(tiny, "llama.attention.head_count_kv", 2)
    refused(tmp_path, data, r"attn_k.weight has shape \(16, 32\).*\(32, 32\)")


@pytest.mark.parametrize("value, match", [(1000, r"rope.dimension_count is 1000, outside \[2, 16\]"),
                                          (15, "rope.dimension_count is 15, not even")])
def test_a_corrupt_rope_dimension_count_is_named(tmp_path, tiny, value, match):
    # a rope dimension past the head ran the compiled decode step out of bounds (SIGSEGV)
    refused(tmp_path, set_u32(tiny, "llama.rope.dimension_count", value), match)


def test_block_count_must_match_the_blocks(tmp_path, tiny):
    refused(tmp_path, set_u32(tiny, "llama.block_count", 3), "tensor blk.2.attn_norm.weight is missing")
    refused(tmp_path, set_u32(tiny, "llama.block_count", 1), "blk.1.* is past the 1 blocks of llama.block_count")
    refused(tmp_path, set_u32(tiny, "llama.block_count", 2**31), r"llama.block_count is 2147483648, outside \[1, 512\]")


def test_metadata_strings_that_are_not_utf8_are_replaced(tmp_path, tiny):
    cfg, text = load(tmp_path, tiny.replace(b"tiny-bpe", b"tiny\xff\xfepe", 1))
    assert cfg.name == "tiny\ufffd\ufffdpe" and isinstance(text, str)


def test_repeated_tokens_are_refused_before_llama_cpp_aborts(tmp_path, tiny):
    one = struct.pack("<Q", 1)
    data = tiny.replace(one + b'"', one + b"!", 1)  # tokens 36 and 37, bytes '!' and '"': now '!' twice
    assert data != tiny
    refused(tmp_path, data, r"tokenizer.ggml.tokens\[37\] repeats an earlier token")


def test_special_token_ids_must_be_in_the_vocabulary(tmp_path, tiny):
    refused(tmp_path, set_u32(tiny, "tokenizer.ggml.eos_token_id", 5000), "tokenizer.ggml.eos_token_id is 5000")


def test_an_unknown_tokenizer_is_unsupported(tmp_path, tiny):
    refused(tmp_path, tiny.replace(b"gpt2", b"gpt3", 1), "tokenizer.ggml.model is 'gpt3'", UnsupportedModelError)


def test_a_huge_count_is_refused_without_allocating(tmp_path, tiny):
    key = b"tokenizer.ggml.tokens" + struct.pack("<II", ARRAY, 8)
    pos = tiny.index(key) + len(key)
    data = tiny[:pos] + struct.pack("<Q", 2**62) + tiny[pos + 8:]
    refused(tmp_path, data, "tokenizer.ggml.tokens.*cannot fit in the")


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_before_it_is_opened(tmp_path, tiny):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        flashlm.load(fifo)
    folder = gguf_to_hf(_written(tmp_path / "t.gguf", tiny), tmp_path / "hf")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelFormatError, match="config.json: not a regular file"):
        flashlm.load(folder)


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def test_flash_layout_records_are_checked(tmp_path, tiny):
    from flashlm.runtime.convert import convert

    flash = convert(_written(tmp_path / "t.gguf", tiny), tmp_path / "t.flash.gguf", calibration_tokens=0)
    mf = GGUFModelFile(flash)
    validate_flash_layout(mf)
    rec = mf.tensors["blk.1.ffn_bundles"]
    mf.tensors["blk.1.ffn_bundles"] = rec.__class__(rec.name, rec.qtype, rec.shape, rec.data[:, :-2], rec.offset)
    with pytest.raises(ModelFormatError, match="blk.1.ffn_bundles is"):
        validate_flash_layout(mf)
    key = b"flashlm.flash.up_types" + struct.pack("<I", ARRAY)
    data = flash.read_bytes()
    pos = data.index(key) + len(key) + 12  # the item type and count, then the first type
    bad = _written(tmp_path / "bad.flash.gguf", data[:pos] + struct.pack("<i", 99) + data[pos + 4:])
    with pytest.raises(ModelFormatError, match="up_types is not one GGML type per layer"):
        flashlm.load(bad, n_ctx=64)


@pytest.fixture
def hf(tmp_path, tiny):
    return gguf_to_hf(_written(tmp_path / "t.gguf", tiny), tmp_path / "hf")


def test_a_safetensors_header_is_checked_against_the_file(hf):
    st = hf / "model.safetensors"
    data = st.read_bytes()
    (hlen,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + hlen])
    st.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ModelFormatError, match="header length"):
        flashlm.load(hf)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 2
    h = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(h)) + h + data[8 + hlen:])
    with pytest.raises(ModelFormatError, match=f"safetensors tensor '{name}' holds"):
        flashlm.load(hf)


@pytest.mark.parametrize("key, value, match", [("hidden_size", None, "key hidden_size is missing"),
                                               ("num_attention_heads", 0, r"num_attention_heads is 0, outside"),
                                               ("rms_norm_eps", "abc", "rms_norm_eps is 'abc', not a number"),
                                               ("vocab_size", 1 << 62, "vocab_size is 4611686018427387904")])
def test_config_json_values_are_checked(hf, key, value, match):
    cfg = json.loads((hf / "config.json").read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=match):
        flashlm.load(hf)


def test_ids_and_text_that_would_abort_llama_cpp_are_refused(tmp_path, tiny):
    # llama.cpp throws through its C API (the process aborts) on an id outside the
    # vocabulary, and on bytes that are not UTF-8; run in a child, so that a regression
    # does not take the test run down
    path = _written(tmp_path / "t.gguf", tiny)
    code = ("import flashlm\nm = flashlm.load(%r, n_ctx=64)\n"
            "for f, x in ((m.detokenize, [10**6]), (m.detokenize, [-1]), (m.tokenize, 'a\\ud800')):\n"
            "    try:\n        f(x)\n    except flashlm.InvalidArgumentError as e:\n        print('refused:', e)\n"
            % str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused: token ids must be integers in [0, 299)") == 2, r.stdout
    assert "refused: the text is not valid Unicode" in r.stdout, r.stdout
