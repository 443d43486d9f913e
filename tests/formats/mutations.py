"""Structure-aware mutations of model files, for the fuzz tests and benchmarks/fuzz_models.py.

A mutation is a list of ops (kind, a, b): kind names what to hit, a picks the target
among the file's fields of that kind, b the value written (both reduced modulo what is
there, so any integers make a valid op and hypothesis can shrink them).

GGUF ops hit the header, the metadata and the tensor-info region: bit flips, counts,
string lengths, dims, offsets, type ids, metadata values, array items, names,
truncation and appended garbage. Safetensors ops hit the header length, the JSON
header's dtypes, shapes and offsets, and config.json's values.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

GGUF_OPS = ("flip", "count", "length", "dim", "offset", "typeid", "scalar", "item", "name", "splice",
            "truncate", "append")
HF_OPS = ("st_hlen", "st_flip", "st_dtype", "st_shape", "st_offsets", "st_truncate", "st_append",
          "cfg_value", "cfg_drop", "cfg_flip")

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFLayout:
    """Where each field of a GGUF header lies: (offset, struct format, value) lists."""

    counts: list = field(default_factory=list)  # tensor/kv counts, array counts, n_dims
    lengths: list = field(default_factory=list)  # string lengths (keys, values, names)
    dims: list = field(default_factory=list)
    offsets: list = field(default_factory=list)  # tensor data offsets
    typeids: list = field(default_factory=list)  # kv value types, array item types, tensor types
    scalars: list = field(default_factory=list)  # metadata scalar values
    items: list = field(default_factory=list)  # numeric array items
    names: list = field(default_factory=list)  # (offset, length) of key names, tensor names, string values
    data_offset: int = 0


def gguf_layout(data: bytes) -> GGUFLayout:
    """The layout of a valid GGUF's header (raises on a malformed one)."""
    lay = GGUFLayout()
    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    lay.counts += [(8, "<Q", n_tensors), (16, "<Q", n_kv)]
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        lay.lengths.append((pos, "<Q", n))
        lay.names.append((pos + 8, n))
        return pos + 8 + n

    def value(pos, t, top):
        if t == STRING:
            return string(pos)
        fmt = _SCALAR[t]
        (lay.scalars if top else lay.items).append((pos, fmt, struct.unpack_from(fmt, data, pos)[0]))
        return pos + struct.calcsize(fmt)

    alignment = 32
    for _ in range(n_kv):
        key, pos = data[pos + 8:string(pos)], string(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        lay.typeids.append((pos, "<I", t))
        pos += 4
        if t == ARRAY:
            it, n = struct.unpack_from("<IQ", data, pos)
            lay.typeids.append((pos, "<I", it))
            lay.counts.append((pos + 4, "<Q", n))
            pos += 12
            for _ in range(n):
                pos = value(pos, it, False)
        else:
            if key == b"general.alignment":
                (alignment,) = struct.unpack_from("<I", data, pos)
            pos = value(pos, t, True)
    for _ in range(n_tensors):
        pos = string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        lay.counts.append((pos, "<I", nd))
        pos += 4
        for _ in range(nd):
            lay.dims.append((pos, "<Q", struct.unpack_from("<Q", data, pos)[0]))
            pos += 8
        lay.typeids.append((pos, "<I", struct.unpack_from("<I", data, pos)[0]))
        lay.offsets.append((pos + 4, "<Q", struct.unpack_from("<Q", data, pos + 4)[0]))
        pos += 12
    lay.data_offset = pos + (-pos % alignment)
    return lay


def _interesting_int(fmt: str, orig, b: int) -> int:
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower()
    top = (1 << bits) - 1
    finite = isinstance(orig, int) or isinstance(orig, float) and math.isfinite(orig)
    orig = int(orig) if finite else 0  # (a JSON value may be anything)
    picks = [0, 1, 2, 3, 7, 255, 256, 4096, (1 << 16), (1 << 31) - 1, 1 << 31, top, top >> 1, (top >> 1) + 1,
             orig - 1, orig + 1, orig * 2, orig // 2, orig + 32, orig * 3, orig + 4096, -1, -orig]
    if b < len(picks) * 4:
        v = picks[b % len(picks)]
    else:
        v = b >> 8
    v &= top
    if signed and v > top >> 1:
        v -= top + 1
    return v


def _interesting_float(orig: float, b: int) -> float:
    picks = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, 3.4e38, orig * 2, orig / 2,
             -orig, orig + 1, 65504.0]
    return picks[b % len(picks)]


def _put(buf: bytearray, pos: int, fmt: str, orig, b: int) -> None:
    if fmt in ("<f", "<d"):
        struct.pack_into(fmt, buf, pos, _interesting_float(orig, b))
    elif fmt == "<?":
        buf[pos] = b & 0xFF
    else:
        struct.pack_into(fmt, buf, pos, _interesting_int(fmt, orig, b))


def mutate_gguf(data: bytes, lay: GGUFLayout, ops) -> bytes:
    """data with each op (kind, a, b) of GGUF_OPS applied in turn."""
    buf = bytearray(data)
    targets = {"count": lay.counts, "length": lay.lengths, "dim": lay.dims, "offset": lay.offsets,
               "typeid": lay.typeids, "scalar": lay.scalars, "item": lay.items}
    for kind, a, b in ops:
        header = max(1, min(lay.data_offset, len(buf)))
        if not buf and kind in ("flip", "splice", "name", "truncate"):
            continue
        if kind == "flip":
            pos = a % header
            buf[pos] ^= 1 << (b % 8)
        elif kind in targets:
            live = [t for t in targets[kind] if t[0] + struct.calcsize(t[1]) <= len(buf)]
            if live:
                pos, fmt, orig = live[a % len(live)]
                _put(buf, pos, fmt, orig, b)
        elif kind == "name":
            live = [(p, n) for p, n in lay.names if n and p + n <= len(buf)]
            if live:
                p, n = live[a % len(live)]
                buf[p + (b >> 8) % n] = b & 0xFF
        elif kind == "splice":
            pos = a % header
            run = bytes((b >> (8 * i)) & 0xFF for i in range(1 + b % 8))
            buf[pos:pos + len(run)] = run
        elif kind == "truncate":
            cut = a % header if b % 2 else a % max(1, len(buf))
            del buf[cut:]
        elif kind == "append":
            buf += bytes((b >> (8 * (i % 8))) & 0xFF for i in range(1 + a % 64))
    return bytes(buf)


# -- safetensors and config.json ------------------------------------------------------

_CFG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "head_dim", "rope_scaling",
             "tie_word_embeddings", "model_type", "bos_token_id", "eos_token_id")
_JSON_VALUES = (0, -1, 1, 2, 3, 7, 64, 1 << 20, 1 << 40, 1 << 62, 1.5, -0.5, 1e308, "abc", None, [], {}, True, "llama",
                {"type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 0.0})
_DTYPES = ("F16", "F32", "BF16", "F64", "I8", "U8", "I32", "F8_E4M3", "XX", 5, None)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _tensor_keys(header: dict) -> list:
    return sorted(k for k in header if k != "__metadata__")


def _mutate_entry(header: dict, kind: str, a: int, b: int) -> None:
    keys = _tensor_keys(header)
    if not keys:
        return
    e = header[keys[a % len(keys)]]
    if kind == "st_dtype":
        e["dtype"] = _DTYPES[b % len(_DTYPES)]
    elif kind == "st_shape":
        shape = list(e.get("shape", []))
        if b % 5 == 0:
            shape.append(_interesting_int("<q", 1, b >> 3))
        elif b % 5 == 1 and shape:
            shape.pop()
        elif shape:
            shape[(b >> 3) % len(shape)] = _JSON_VALUES[(b >> 6) % len(_JSON_VALUES)] if b % 5 == 2 else \
                _interesting_int("<q", shape[(b >> 3) % len(shape)], b >> 6)
        e["shape"] = shape
    else:
        offs = list(e.get("data_offsets", [0, 0]))
        i = (b >> 3) % 2
        offs[i] = _interesting_int("<q", offs[i], b >> 4) if b % 4 else _JSON_VALUES[(b >> 4) % len(_JSON_VALUES)]
        e["data_offsets"] = offs


def mutate_safetensors(data: bytes, ops) -> bytes:
    """A safetensors file's bytes with the st_* ops applied."""
    buf = data
    for kind, a, b in ops:
        if kind in ("st_dtype", "st_shape", "st_offsets"):
            try:
                header, body = split_safetensors(buf)
            except (ValueError, struct.error):
                continue
            if isinstance(header, dict):
                _mutate_entry(header, kind, a, b)
                buf = join_safetensors(header, body)
        elif kind == "st_hlen" and len(buf) >= 8:
            orig = struct.unpack_from("<Q", buf, 0)[0]
            buf = struct.pack("<Q", _interesting_int("<Q", orig, b)) + buf[8:]
        elif kind == "st_flip" and len(buf) > 8:
            n = min(len(buf), 8 + struct.unpack_from("<Q", buf, 0)[0])
            pos = a % n
            buf = buf[:pos] + bytes([buf[pos] ^ (1 << (b % 8))]) + buf[pos + 1:]
        elif kind == "st_truncate":
            buf = buf[:a % max(1, len(buf))]
        elif kind == "st_append":
            buf = buf + bytes((b >> (8 * (i % 8))) & 0xFF for i in range(1 + a % 64))
    return buf


def mutate_config(text: bytes, ops) -> bytes:
    """config.json's bytes with the cfg_* ops applied."""
    for kind, a, b in ops:
        if kind == "cfg_flip" and text:
            pos = a % len(text)
            text = text[:pos] + bytes([text[pos] ^ (1 << (b % 8))]) + text[pos + 1:]
            continue
        try:
            cfg = json.loads(text)
        except ValueError:
            continue
        if not isinstance(cfg, dict):
            continue
        key = _CFG_KEYS[a % len(_CFG_KEYS)]
        if kind == "cfg_drop":
            cfg.pop(key, None)
        elif kind == "cfg_value":
            cfg[key] = _JSON_VALUES[b % len(_JSON_VALUES)]
        text = json.dumps(cfg).encode()
    return text


def mutate_hf(files: dict, ops) -> dict:
    """An HF folder's {name: bytes} with the ops applied to model.safetensors and config.json."""
    out = dict(files)
    st_ops = [o for o in ops if o[0].startswith("st_")]
    out["model.safetensors"] = mutate_safetensors(files["model.safetensors"], st_ops)
    out["config.json"] = mutate_config(files["config.json"], [o for o in ops if o[0].startswith("cfg_")])
    return out
