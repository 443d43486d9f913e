"""Checks that a model file can be trusted, before anything allocates, computes or hands
it to native code: each failure a ModelFormatError (or UnsupportedModelError) naming the
field and what to do.

    check_regular_file      a path that is not a regular file (a FIFO would hang) is refused
    Metadata                typed, range-checked reads of metadata values
    string_table            where each string of a GGUF string array lies, bounds-checked
    check_tokenizer         the tokenizer.ggml.* arrays, exactly what llama.cpp reads
    validate_flash_layout   a flash layout's metadata and records against its tensors
    check_shapes            every tensor a model needs, present with its shape
    safetensors_entries     a safetensors header's dtypes, shapes and offsets against the file
"""

from __future__ import annotations

import math
import os
import stat

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: it aborts past it
MAX_EXPERTS = 256
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece
TOKEN_TYPES = 7  # llama_token_type: undefined, normal, unknown, control, user-defined, unused, byte
FLASH_KEY = "flashlm.flash"  # flashload/layout.py's KEY (formats cannot import flashload)
INT_TYPES = tuple(GGUFValueType[t] for t in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64",
                                             "INT64"))
FIX = "the file is corrupt or was converted wrongly: download or convert it again"


def check_regular_file(path) -> None:
    """ModelNotFoundError if path does not exist; ModelFormatError if it is not a regular
    file (a FIFO, socket or device: opening one could block forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: no such file; check the path or run `flashlm pull NAME`") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{path}: not a regular file (a FIFO, socket or device); pass a model file")


class Metadata:
    """Typed reads of metadata `values` (a GGUF's, or an HF config.json) for file `where`:
    a value missing without a default, of the wrong type, or out of range is a
    ModelFormatError naming its key. `prefix` is put before each key (e.g. "llama.");
    `noun` names what a key is in messages."""

    def __init__(self, values: dict, where, prefix: str = "", noun: str = "metadata key"):
        self.values, self.where, self.prefix, self.noun = values, where, prefix, noun

    def _get(self, key: str, default):
        v = self.values.get(self.prefix + key)  # (a JSON null is absent too)
        if v is None:
            v = default
        if v is None:
            raise ModelFormatError(f"{self.where}: {self.noun} {self.prefix + key} is missing; {FIX}")
        return v

    def _bad(self, key: str, v, what: str):
        return ModelFormatError(f"{self.where}: {self.noun} {self.prefix + key} is {v!r}, {what}; {FIX}")

    def integer(self, key: str, default=None, lo: int = 0, hi: int = 2**31 - 1) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise self._bad(key, v, "not an integer")
        if not lo <= int(v) <= hi:
            raise self._bad(key, v, f"outside [{lo}, {hi}]")
        return int(v)

    def number(self, key: str, default=None, lo: float = -math.inf, hi: float = math.inf) -> float:
        """A finite number in [lo, hi]."""
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise self._bad(key, v, "not a number")
        if not (math.isfinite(v) and lo <= v <= hi):
            raise self._bad(key, v, f"not a finite number in [{lo}, {hi}]")
        return float(v)

    def text(self, key: str, default=None) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, v, "not a string")
        return v


# -- GGUF string arrays (compiled: a vocabulary is 50k-260k strings) ----------------------

@numba.njit(cache=True)
def string_table(data, start, count, limit):
    """Where each of `count` GGUF strings (u64 length, then bytes) from byte `start` of
    data lies: (table, bad), table[i] the offset of string i from start and table[count]
    the end; bad is the first string running past byte `limit`, else -1. The caller
    bounds count by (limit - start) // 8."""
    table = np.empty(count + 1, np.int64)
    p = start
    for i in range(count):
        if p + 8 > limit:
            return table, i
        n = np.uint64(0)
        for k in range(8):
            n |= np.uint64(data[p + k]) << np.uint64(8 * k)
        if n > np.uint64(limit - p - 8):
            return table, i
        table[i] = p - start
        p += 8 + np.int64(n)
    table[count] = p - start
    return table, -1


@numba.njit(cache=True)
def _same(raw, table, a, b):
    la, lb = table[a + 1] - table[a], table[b + 1] - table[b]
    if la != lb:
        return False
    for k in range(8, la):
        if raw[table[a] + k] != raw[table[b] + k]:
            return False
    return True


@numba.njit(cache=True)
def _first_duplicate(raw, table):
    """The later index of two equal strings, or -1 (FNV-1a hashes, sorted)."""
    n = table.shape[0] - 1
    h = np.empty(n, np.uint64)
    for i in range(n):
        x = np.uint64(14695981039346656037)
        for k in range(table[i] + 8, table[i + 1]):
            x = (x ^ np.uint64(raw[k])) * np.uint64(1099511628211)
        h[i] = x
    order = np.argsort(h)
    s = 0
    for e in range(1, n + 1):
        if e < n and h[order[e]] == h[order[s]]:
            continue
        for a in range(s, e):
            for b in range(a + 1, e):
                if _same(raw, table, order[a], order[b]):
                    return max(order[a], order[b])
        s = e
    return -1


@numba.njit(cache=True)
def _hex(c):
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    return -1


@numba.njit(cache=True)
def _byte_tokens(raw, table, types):
    """(bytes b with a token <0xBB> or the one-byte token b; the first token typed BYTE
    that is not <0xBB>, or -1)."""
    covered = np.zeros(256, np.bool_)
    bad = -1
    for i in range(table.shape[0] - 1):
        s, n = table[i] + 8, table[i + 1] - table[i] - 8
        v = -1
        if n == 6 and raw[s] == 60 and raw[s + 1] == 48 and raw[s + 2] == 120 and raw[s + 5] == 62:
            hi, lo = _hex(raw[s + 3]), _hex(raw[s + 4])
            if hi >= 0 and lo >= 0:
                v = hi * 16 + lo
        if v >= 0:
            covered[v] = True
        elif n == 1:
            covered[raw[s]] = True
        if v < 0 and types.shape[0] > i and types[i] == 6 and bad < 0:
            bad = i
    return covered, bad


@numba.njit(cache=True)
def _first_bad_merge(raw, table):
    """The first merge that is not "left right" (two non-empty parts), or -1."""
    for i in range(table.shape[0] - 1):
        s, e = table[i] + 8, table[i + 1]
        ok = False
        for k in range(s + 1, e - 1):
            if raw[k] == 32:
                ok = True
                break
        if not ok:
            return i
    return -1


# -- the tokenizer --------------------------------------------------------------------

def _array(mf, key: str, item_types, required: bool = False):
    """(values, table) of metadata array key, checked to hold item_types: a string array's
    raw bytes and string_table, a numeric one's typed values and None; (None, None) if absent."""
    field = mf.reader.fields.get(key)
    if field is None:
        if required:
            raise ModelFormatError(f"{mf.path}: metadata key {key} is missing; {FIX}")
        return None, None
    if field.types[0] != GGUFValueType.ARRAY or field.types[-1] not in item_types:
        raise ModelFormatError(f"{mf.path}: metadata key {key} is not an array of "
                               f"{' or '.join(t.name for t in item_types)}; {FIX}")
    if field.types[-1] == GGUFValueType.STRING:
        return field.parts[-1], field.parts[-2]
    return field.parts[-1].view(mf.reader.gguf_scalar_to_np[field.types[-1]]), None


def check_tokenizer(mf, n_vocab: int) -> None:
    """The tokenizer.ggml.* metadata a vocabulary load reads (ours, runtime/gguf_tokenizer,
    and llama.cpp's, which must not crash on a file flashlm accepts): a known model, n_vocab unique tokens, scores and types
    of the same length (types known, BYTE tokens spelled <0xXX>), well-formed merges,
    special token ids inside the vocabulary."""
    md = Metadata(mf.metadata, mf.path, "tokenizer.ggml.")
    model = md.text("model")
    if model not in TOKENIZER_MODELS:
        raise UnsupportedModelError(f"{mf.path}: tokenizer.ggml.model is {model!r}; flashlm reads "
                                    f"{' and '.join(TOKENIZER_MODELS)} vocabularies")
    md.text("pre", "default")
    raw, table = _array(mf, "tokenizer.ggml.tokens", (GGUFValueType.STRING,), required=True)
    n = table.shape[0] - 1
    if n != n_vocab:
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.tokens has {n} tokens but token_embd.weight has"
                               f" {n_vocab} rows; {FIX}")
    if np.any(np.diff(table) == 8):
        i = int(np.argmax(np.diff(table) == 8))
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.tokens[{i}] is empty; {FIX}")
    dup = _first_duplicate(raw, table)
    if dup >= 0:
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.tokens[{dup}] repeats an earlier token; {FIX}")
    _check_scores_and_types(mf, raw, table, n, model)
    if model == "gpt2":
        mraw, mtable = _array(mf, "tokenizer.ggml.merges", (GGUFValueType.STRING,), required=True)
        bad = _first_bad_merge(mraw, mtable)
        if bad >= 0:
            raise ModelFormatError(f"{mf.path}: tokenizer.ggml.merges[{bad}] is not two tokens joined by a space;"
                                   f" {FIX}")
    for key in list(mf.metadata):
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            md.integer(key[len("tokenizer.ggml."):], hi=n - 1)
    if "tokenizer.chat_template" in mf.metadata:
        Metadata(mf.metadata, mf.path).text("tokenizer.chat_template")


def _check_scores_and_types(mf, raw, table, n: int, model: str) -> None:
    scores, _ = _array(mf, "tokenizer.ggml.scores", (GGUFValueType.FLOAT32, GGUFValueType.INT32))
    if scores is not None and (len(scores) != n or not np.isfinite(scores).all()):
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.scores is not {n} finite numbers; {FIX}")
    types, _ = _array(mf, "tokenizer.ggml.token_type", (GGUFValueType.INT32,))
    types = np.zeros(0, np.int32) if types is None else types
    if types.size and (types.size != n or types.min() < 0 or types.max() >= TOKEN_TYPES):
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.token_type is not {n} token types (0-6); {FIX}")
    covered, bad = _byte_tokens(raw, table, types)
    if bad >= 0:
        raise ModelFormatError(f"{mf.path}: tokenizer.ggml.tokens[{bad}] is typed BYTE but is not <0xXX>;"
                               f" {FIX}")
    if model == "llama" and not covered.all():  # SentencePiece falls back to byte tokens for any byte
        raise ModelFormatError(f"{mf.path}: the vocabulary (tokenizer.ggml.tokens) has no token for byte"
                               f" 0x{int(np.argmin(covered)):02X}; {FIX}")


# -- tensors --------------------------------------------------------------------------

def _squeeze(shape) -> tuple:
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def check_shapes(mf, required: dict, optional: dict) -> None:
    """Each tensor named in required (name -> shape, numpy order) present with its shape,
    and each of optional that is present. Leading 1s do not count (the flash layout
    writes vectors as one row)."""
    for name, shape in list(required.items()) + list(optional.items()):
        t = mf.tensors.get(name)
        if t is None:
            if name in required:
                raise ModelFormatError(f"{mf.path}: tensor {name} is missing; {FIX}")
        elif _squeeze(t.shape) != _squeeze(shape):
            raise ModelFormatError(f"{mf.path}: tensor {name} has shape {tuple(t.shape)}, the metadata says "
                                   f"{tuple(shape)}; {FIX}")


def row_bytes(qtype, n: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n // bs * ts


def validate_flash_layout(mf) -> None:
    """A flash layout's metadata and records, against its tensors (flashload/layout.py
    describes the layout): the layout version, one up type per layer, and for each
    layer the gate (n_ff, n_embd), the records (n_ff rows of gate row | up row | Q8_0
    down row), their checksums, the neuron ids and the low-rank factors.
    ModelFormatError naming the field otherwise."""
    md = Metadata(mf.metadata, mf.path)
    md.integer(FLASH_KEY + ".version")
    md.text(FLASH_KEY + ".neuron_order", "identity")
    n_layer = md.integer(f"{mf.arch}.block_count", lo=1, hi=MAX_LAYERS)
    types, _ = _array(mf, FLASH_KEY + ".up_types", INT_TYPES, required=True)
    if len(types) != n_layer or not all(int(t) in GGMLQuantizationType._value2member_map_ for t in types):
        raise ModelFormatError(f"{mf.path}: {FLASH_KEY}.up_types is not one GGML type per layer; convert again")
    for i, up in enumerate(types):
        _check_flash_layer(mf, i, GGMLQuantizationType(int(up)))


def _check_flash_layer(mf, i: int, up) -> None:
    t = mf.tensors
    gate, rec, ids = (t.get(f"blk.{i}.{n}") for n in ("ffn_gate.weight", "ffn_bundles", "ffn_neuron_ids"))
    if gate is None or rec is None or ids is None or len(gate.shape) != 2:
        raise ModelFormatError(f"{mf.path}: flash layout without layer {i}'s gate, records or neuron ids;"
                               " convert again")
    n_ff, n_embd = gate.shape
    if up not in GGML_QUANT_SIZES or n_embd % 32 or n_embd % GGML_QUANT_SIZES[up][0]:
        raise ModelFormatError(f"{mf.path}: layer {i}'s up type {up.name} does not fit rows of {n_embd}; convert again")
    width = gate.data.shape[1] + row_bytes(up, n_embd) + row_bytes(GGMLQuantizationType.Q8_0, n_embd)
    if rec.qtype != GGMLQuantizationType.I8 or rec.data.shape != (n_ff, width):
        raise ModelFormatError(f"{mf.path}: blk.{i}.ffn_bundles is {rec.data.shape} bytes, not {n_ff} records of "
                               f"{width}; convert again")
    if ids.qtype != GGMLQuantizationType.I32 or ids.data.nbytes != 4 * n_ff:
        raise ModelFormatError(f"{mf.path}: blk.{i}.ffn_neuron_ids is not {n_ff} int32 ids; convert again")
    sums = t.get(f"blk.{i}.ffn_bundle_sums")  # (layout version 4) one XXH64 per record
    if sums is not None and (sums.qtype != GGMLQuantizationType.I32 or sums.data.nbytes != 8 * n_ff):
        raise ModelFormatError(f"{mf.path}: blk.{i}.ffn_bundle_sums is not {n_ff} record checksums; convert again")
    a, b = t.get(f"blk.{i}.ffn_gate_lr_a"), t.get(f"blk.{i}.ffn_gate_lr_b")
    if (a is None) != (b is None) or a is not None and not (
            a.qtype == b.qtype == GGMLQuantizationType.F16 and len(a.shape) == len(b.shape) == 2
            and a.shape[1] == n_embd and b.shape == (n_ff, a.shape[0])):
        raise ModelFormatError(f"{mf.path}: layer {i}'s low-rank gate factors do not match its gate; convert again")


# -- safetensors ----------------------------------------------------------------------

ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_entries(path, header, base: int, size: int) -> dict:
    """{name: (dtype, shape, start, end)} of a safetensors header (JSON, already parsed)
    whose tensor bytes start at byte `base` of a file of `size` bytes: each dtype known,
    each shape a list of non-negative integers, each byte range as long as its shape and
    dtype say, the ranges together covering the rest of the file."""
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: the safetensors header is not a JSON object; {FIX}")
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: safetensors tensor {name!r}"
        if not isinstance(e, dict) or e.get("dtype") not in ST_ITEMSIZE:
            raise ModelFormatError(f"{where} has dtype {e.get('dtype') if isinstance(e, dict) else e!r}; {FIX}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not _ints(shape) or len(shape) > 8:
            raise ModelFormatError(f"{where} has shape {shape!r}, not a list of sizes; {FIX}")
        if not _ints(offs) or len(offs) != 2 or not offs[0] <= offs[1] <= size - base:
            raise ModelFormatError(f"{where} has data_offsets {offs!r}, not a byte range inside the file; {FIX}")
        if offs[1] - offs[0] != math.prod(shape) * ST_ITEMSIZE[e["dtype"]]:
            raise ModelFormatError(f"{where} holds {offs[1] - offs[0]} bytes, not {shape} of {e['dtype']}; {FIX}")
        out[name] = (e["dtype"], tuple(shape), base + offs[0], base + offs[1])
    end = base  # the format's rule, as its own reader checks: the ranges tile the data, in order
    for name, (_, _, start, stop) in sorted(out.items(), key=lambda kv: kv[1][2:]):
        if start != end:
            raise ModelFormatError(f"{path}: safetensors tensor {name!r} starts at byte {start:,}, not {end:,}; {FIX}")
        end = stop
    if end != size:
        raise ModelFormatError(f"{path}: the safetensors tensors end at byte {end:,} but the file has {size:,}; {FIX}")
    return out


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
