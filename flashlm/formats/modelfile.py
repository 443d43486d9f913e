"""Model files: GGUF (gguf's memmapped reader) and HF folders (safetensors, mmapped).

Both give the same thing: metadata, and for each tensor a `TensorRef` whose `data` is a
zero-copy view into the mapped file. Nothing here copies weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderField

from ..errors import ModelFormatError, UnsupportedModelError
from ..kernels_cpu.quants import SUPPORTED_TYPES
from .validate import check_regular_file, safetensors_entries, string_table


@dataclass(frozen=True)
class TensorRef:
    """One weight tensor in a mapped file.

    shape is numpy order (rows, cols) for matrices; data is (rows, row_bytes) uint8 for
    every type, so kernels see one layout. offset is the byte offset in the file.

    data is always a read-only view, also of weights held in memory (a flash window, the
    expert cache's pool): numba compiles a kernel once per argument type, and a read-only
    array is another type than a writable one, so this halves the compiling a first run
    does (measured: the decode step 37 s and the experts' 39 s, each once, not twice).
    """
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int
    source: Path | None = None  # the file holding it, where a model has several

    def __post_init__(self):
        object.__setattr__(self, "data", readonly(self.data))

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def readonly(a: np.ndarray) -> np.ndarray:
    """a, or a read-only view of it (the kernels' one weight type; TensorRef)."""
    if isinstance(a, np.ndarray) and a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


class _Unsupported(ValueError):
    """A well-formed GGUF that flashlm does not read."""


class _LazyArrayReader(GGUFReader):
    """gguf's reader, except that metadata arrays are kept as one raw byte view, and that
    every count, length, dim, offset and type id is checked against the file before use.

    The stock reader makes a numpy object per array element: for Gemma's 262k-token
    vocabulary that is 20 s and 700 MB. Arrays are decoded on demand instead
    (`GGUFModelFile.array`); a string array's parts are (string_table, raw bytes). The
    stock reader also trusts what it reads: a corrupt count or length ran it past the end
    of the file (OverflowError, IndexError) or to a size of terabytes.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        offset, count, itemsize = int(offset), int(count), np.dtype(dtype).itemsize  # (Python ints: no wrapping)
        if offset < 0 or count < 0 or offset + count * itemsize > len(self.data):
            raise ValueError(f"{count:,} item(s) of {itemsize} bytes at byte {offset:,} run past the end of the file"
                             f" ({len(self.data):,} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _build_fields(self, offs, count):
        if self.byte_order == "S":
            raise _Unsupported("it is a big-endian GGUF, which flashlm does not read")
        _bound("GGUF.kv_count", count, len(self.data) - offs, 13)
        for _ in range(int(count)):
            orig = offs
            klen, kdata = self._get_str(offs)
            key = bytes(kdata).decode("utf-8", errors="replace")
            offs += 8 + len(kdata)
            try:
                raw_type = self._get(offs, np.uint32)
                size, parts, idxs, types = self._get_field_parts(offs + 4, int(raw_type[0]))
            except ValueError as e:
                raise ValueError(f"metadata key {key!r}: {e}") from None
            self._push_field(ReaderField(orig, key, [klen, kdata, raw_type, *parts], [i + 3 for i in idxs], types),
                             skip_sum=True)
            offs += 4 + size
        return offs

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
        count = int(self._get(orig_offs + 4, np.uint64)[0])
        start, limit = orig_offs + 12, len(self.data)
        if item_type == GGUFValueType.STRING:
            _bound("a string array", count, limit - start, 8)
            table, bad = string_table(self.data, start, count, limit)
            if bad >= 0:
                raise ValueError(f"string {bad:,} of {count:,} runs past the end of the file")
            end = start + int(table[-1])
            parts = [table, self.data[start:end]]
        elif item_type in self.gguf_scalar_to_np:
            size = np.dtype(self.gguf_scalar_to_np[item_type]).itemsize
            _bound("an array", count, limit - start, size)
            end = start + count * size
            parts = [self.data[start:end]]
        else:
            raise ValueError(f"arrays of {item_type.name} are not supported")
        return end - orig_offs, parts, [len(parts) - 1], [GGUFValueType.ARRAY, item_type]

    def _build_tensor_info(self, offs, count):
        _bound("GGUF.tensor_count", count, len(self.data) - offs, 32)
        fields = []
        for i in range(int(count)):
            try:
                field = self._get_tensor_info_field(offs)
            except ValueError as e:
                raise ValueError(f"tensor info {i}: {e}") from None
            if not 1 <= int(field.parts[2][0]) <= 4:
                raise ValueError(f"tensor {field.name}: {int(field.parts[2][0])} dimensions (GGUF has 1 to 4)")
            offs += sum(int(part.nbytes) for part in field.parts)
            fields.append(field)
        return offs, fields

    def _build_tensors(self, start_offs, fields):
        expected = 0  # the format lays tensors out in order, each padded to the alignment (llama.cpp checks)
        for field in fields:
            expected = _check_tensor_info(field, int(start_offs), int(self.alignment), len(self.data), expected)
        super()._build_tensors(start_offs, fields)


def _bound(what: str, count, room: int, item_bytes: int) -> None:
    """A count of items of at least item_bytes each must fit in the room left."""
    if int(count) > max(room, 0) // item_bytes:
        raise ValueError(f"{what} of {int(count):,} items cannot fit in the {max(room, 0):,} bytes left in the file")


def _check_tensor_info(field, start: int, alignment: int, size: int, expected: int) -> int:
    """A tensor's type id, dims and data offset (`expected`, where the tensors before it
    end), against the format and the file size; returns where the next one starts."""
    _, _, _, dims, raw_type, offset = field.parts
    name = field.name
    try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise ValueError(f"tensor {name}: unknown type id {int(raw_type[0])}") from None
    bs, ts = GGML_QUANT_SIZES[qtype]
    dims = [int(d) for d in dims]
    if min(dims) < 1 or dims[0] % bs:
        raise ValueError(f"tensor {name}: dims {dims} (each must be at least 1, and rows a multiple of"
                         f" {qtype.name}'s {bs}-element blocks)")
    off, nbytes = int(offset[0]), math.prod(dims) // bs * ts
    if off != expected:
        raise ValueError(f"tensor {name}: data offset {off:,}, but the tensors before it end at {expected:,}")
    if start + off + nbytes > size:
        raise ValueError(f"truncated: tensor {name} ends at byte {start + off + nbytes:,} but the file has {size:,}")
    return off + nbytes + (-nbytes % alignment)


def _value(field):
    """A scalar metadata field's value; strings decoded, bytes that are not UTF-8 replaced."""
    v = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(v).decode("utf-8", errors="replace")
    return v[0].item()


class GGUFModelFile:
    """A GGUF file opened with gguf's memmapped reader, its header checked against the file."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise ModelFormatError(f"{self.path}: is a folder without config.json; pass a .gguf file or an HF model folder")
        check_regular_file(self.path)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic {magic!r}); pass a .gguf model file")
        try:
            self.reader = _LazyArrayReader(self.path)
        except _Unsupported as e:
            raise UnsupportedModelError(f"{self.path}: {e}; convert it to a little-endian GGUF") from e
        except (ValueError, IndexError, struct.error, KeyError) as e:
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF file ({e}); download the file again") from e
        self.metadata = {name: _value(f) for name, f in self.reader.fields.items()
                         if f.types and f.types[0] != GGUFValueType.ARRAY}
        self.arch = self.metadata.get("general.architecture")
        if not isinstance(self.arch, str) or not self.arch:
            raise ModelFormatError(f"{self.path}: GGUF has no general.architecture; is it a model file?")
        self.tensors: dict[str, TensorRef] = {}
        for t in self.reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = t.data
            if data.dtype != np.uint8:  # F32/F16 come typed; kernels take raw bytes
                data = data.reshape(-1).view(np.uint8)
            rows = math.prod(shape[:-1])
            data = data.reshape(rows, -1)
            self.tensors[t.name] = TensorRef(t.name, t.tensor_type, shape, data, int(t.data_offset))

    def array(self, key: str):
        """Decode metadata array `key` (a list of str, or a numpy array), or None."""
        field = self.reader.fields.get(key)
        if field is None or field.types[0] != GGUFValueType.ARRAY:
            return None
        item_type = field.types[-1]
        raw = field.parts[-1]
        if item_type == GGUFValueType.STRING:
            table, buf = field.parts[-2], raw.tobytes()
            return [buf[a + 8:b].decode("utf-8", errors="replace") for a, b in zip(table[:-1], table[1:])]
        return raw.view(self.reader.gguf_scalar_to_np[item_type])

    def close(self):
        # The memmap closes when the last view goes; drop ours.
        self.tensors = {}
        self.reader = None


# HF safetensors dtype names -> GGML types the kernels read.
_ST_DTYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}
_MAX_ST_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


class HFModelFile:
    """An HF folder: config.json, *.safetensors and tokenizer.json, mmapped."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, name_map):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise ModelFormatError(f"{self.path}: folder has no config.json; pass a .gguf file or an HF model folder")
        check_regular_file(cfg)
        try:
            self.config = json.loads(cfg.read_bytes())
        except ValueError as e:  # JSON or UTF-8
            raise ModelFormatError(f"{cfg}: invalid JSON ({e}); download the model again") from e
        if not isinstance(self.config, dict):
            raise ModelFormatError(f"{cfg}: not a JSON object; download the model again")
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        self.arch = self.config.get("model_type", archs[0] if isinstance(archs, list) and archs else "?")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{self.path}: no *.safetensors files in the folder")
        self.tensors: dict[str, TensorRef] = {}
        self._maps = []
        for f in files:
            self._open_safetensors(f, name_map)

    def _open_safetensors(self, path: Path, name_map):
        # safetensors layout: u64 header length, JSON header, then raw tensor bytes. The
        # header is checked against the file (validate.safetensors_entries); the bytes are
        # mapped so that tensors are views into one read-only mmap (zero copy).
        check_regular_file(path)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            hlen = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 <= hlen <= min(size - 8, _MAX_ST_HEADER):
                raise ModelFormatError(f"{path}: not a valid safetensors file (header length {hlen:,} in a file of"
                                       f" {size:,} bytes); download the model again")
            try:
                header = json.loads(fh.read(hlen))
            except ValueError as e:
                raise ModelFormatError(f"{path}: not a valid safetensors file ({e}); download the model again") from e
        entries = safetensors_entries(path, header, 8 + hlen, size)
        mm = np.memmap(path, mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)
        self._maps.append(mm)
        for key, (dtype, shape, start, end) in entries.items():
            gguf_name = name_map(key)
            if gguf_name is None:
                continue
            qtype = _ST_DTYPES.get(dtype)
            if qtype is None:
                raise UnsupportedModelError(f"{path}: tensor {key} has dtype {dtype}; flashlm reads F32, F16 and BF16")
            if not shape or min(shape) < 1:
                raise ModelFormatError(f"{path}: tensor {key} has shape {list(shape)}; download the model again")
            data = mm[start:end].reshape(math.prod(shape[:-1]), -1)
            self.tensors[gguf_name] = TensorRef(gguf_name, qtype, shape, data, start, path)

    def close(self):
        self.tensors = {}
        self._maps = []


def check_tensor_types(mf) -> None:
    """Refuse a file whose tensors use a type the kernels cannot decode, or whose bytes do
    not hold exactly their shape in their type (the kernels read what the shape says)."""
    for t in mf.tensors.values():
        bs, ts = GGML_QUANT_SIZES[t.qtype]
        if t.shape[-1] % bs:
            raise ModelFormatError(f"{mf.path}: tensor {t.name} has a row of {t.shape[-1]} elements, not a"
                                   f" multiple of {bs}")
        rows = math.prod(t.shape[:-1])
        if t.data.shape != (rows, t.shape[-1] // bs * ts) or t.data.dtype != np.uint8:
            raise ModelFormatError(f"{mf.path}: tensor {t.name} holds {t.data.shape} bytes, not {t.shape} of"
                                   f" {t.qtype.name}; download the file again")
        if t.name.endswith((".ffn_bundles", ".ffn_bundle_sums", ".ffn_neuron_ids")):  # the flash layout's records
            continue
        if t.qtype not in SUPPORTED_TYPES:
            names = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise UnsupportedModelError(
                f"{mf.path}: tensor {t.name} uses {t.qtype.name}, which flashlm does not support yet"
                f" (supported: {names}); use a file quantized to one of those")
