"""Model files: GGUF (gguf's memmapped reader) and HF folders (safetensors, mmapped).

Both give the same thing: metadata, and for each tensor a `TensorRef` whose `data` is a
zero-copy view into the mapped file. Nothing here copies weights.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from ..kernels_cpu.quants import SUPPORTED_TYPES


@dataclass(frozen=True)
class TensorRef:
    """One weight tensor in a mapped file.

    shape is numpy order (rows, cols) for matrices; data is (rows, row_bytes) uint8 for
    every type, so kernels see one layout. offset is the byte offset in the file.
    """
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int
    source: Path | None = None  # the file holding it, where a model has several

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class _LazyArrayReader(GGUFReader):
    """gguf's reader, except that metadata arrays are kept as one raw byte view.

    The stock reader makes a numpy object per array element: for Gemma's 262k-token
    vocabulary that is 20 s and 700 MB. Arrays are decoded on demand instead
    (`GGUFModelFile.array`); the tokenizer itself comes from llama.cpp.
    """

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
        count = int(self._get(orig_offs + 4, np.uint64)[0])
        start = orig_offs + 12
        if item_type == GGUFValueType.STRING:
            end = _skip_strings(self.data, start, count)
        elif item_type in self.gguf_scalar_to_np:
            end = start + count * np.dtype(self.gguf_scalar_to_np[item_type]).itemsize
        else:
            raise ValueError(f"nested GGUF arrays are not supported (type {item_type})")
        raw = self.data[start:end]
        return end - orig_offs, [raw], [0], [GGUFValueType.ARRAY, item_type]


def _skip_strings(data: np.memmap, offs: int, count: int) -> int:
    buf = memoryview(data)
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        (n,) = unpack(buf, offs)
        offs += 8 + n
    return offs


class GGUFModelFile:
    """A GGUF file opened with gguf's memmapped reader."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelNotFoundError(f"{self.path}: no such file; check the path or run `flashlm pull NAME`")
        if self.path.is_dir():
            raise ModelFormatError(f"{self.path}: is a folder without config.json; pass a .gguf file or an HF model folder")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic {magic!r}); pass a .gguf model file")
        try:
            self.reader = _LazyArrayReader(self.path)
        except (ValueError, IndexError, struct.error, KeyError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF file ({e}); download the file again") from e
        self.metadata = {}
        for name, field in self.reader.fields.items():
            if field.types and field.types[0] == GGUFValueType.ARRAY:
                continue
            self.metadata[name] = field.contents()
        self.arch = self.metadata.get("general.architecture")
        if not isinstance(self.arch, str):
            raise ModelFormatError(f"{self.path}: GGUF has no general.architecture; is it a model file?")
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorRef] = {}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelFormatError(
                    f"{self.path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,}"
                    f" but the file has {size:,}; download the file again")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = t.data
            if data.dtype != np.uint8:  # F32/F16 come typed; kernels take raw bytes
                data = data.reshape(-1).view(np.uint8)
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            data = data.reshape(rows, -1)
            self.tensors[t.name] = TensorRef(t.name, t.tensor_type, shape, data, int(t.data_offset))

    def array(self, key: str):
        """Decode metadata array `key` (a list of str, or a numpy array), or None."""
        field = self.reader.fields.get(key)
        if field is None:
            return None
        item_type = field.types[-1]
        raw = field.parts[-1]
        if item_type == GGUFValueType.STRING:
            buf, out, offs = raw.tobytes(), [], 0
            while offs < len(buf):
                (n,) = struct.unpack_from("<Q", buf, offs)
                out.append(buf[offs + 8: offs + 8 + n].decode("utf-8", errors="replace"))
                offs += 8 + n
            return out
        return raw.view(self.reader.gguf_scalar_to_np[item_type])

    def close(self):
        # The memmap closes when the last view goes; drop ours.
        self.tensors = {}
        self.reader = None


# HF safetensors dtype names -> GGML types the kernels read.
_ST_DTYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}


class HFModelFile:
    """An HF folder: config.json, *.safetensors and tokenizer.json, mmapped."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, name_map):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise ModelFormatError(f"{self.path}: folder has no config.json; pass a .gguf file or an HF model folder")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{cfg}: invalid JSON ({e})") from e
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        self.arch = self.config.get("model_type", archs[0])
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{self.path}: no *.safetensors files in the folder")
        self.tensors: dict[str, TensorRef] = {}
        self._maps = []
        for f in files:
            self._open_safetensors(f, name_map)

    def _open_safetensors(self, path: Path, name_map):
        # safetensors layout: u64 header length, JSON header, then raw tensor bytes.
        # We read the header with the safetensors library's format and map the bytes
        # ourselves so that tensors are views into one read-only mmap (zero copy).
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise ModelFormatError(f"{path}: not a valid safetensors file ({e})") from e
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (hlen,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(hlen))
        mm = np.memmap(path, mode="r", dtype=np.uint8)
        self._maps.append(mm)
        base = 8 + hlen
        for key in keys:
            info = header[key]
            qtype = _ST_DTYPES.get(info["dtype"])
            if qtype is None:
                raise UnsupportedModelError(f"{path}: tensor {key} has dtype {info['dtype']}; flashlm reads F32, F16 and BF16")
            start, end = info["data_offsets"]
            if base + end > size:
                raise ModelFormatError(f"{path}: truncated at tensor {key}; download the file again")
            shape = tuple(int(d) for d in info["shape"])
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            data = mm[base + start: base + end].reshape(rows, -1)
            gguf_name = name_map(key)
            if gguf_name is not None:
                self.tensors[gguf_name] = TensorRef(gguf_name, qtype, shape, data, base + start, path)

    def close(self):
        self.tensors = {}
        self._maps = []


def check_tensor_types(mf) -> None:
    """Refuse a file whose tensors use a type the kernels cannot decode."""
    for t in mf.tensors.values():
        if t.name.endswith((".ffn_bundles", ".ffn_neuron_ids")):  # the flash layout's records and their ids
            continue
        if t.qtype not in SUPPORTED_TYPES:
            names = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise UnsupportedModelError(
                f"{mf.path}: tensor {t.name} uses {t.qtype.name}, which flashlm does not support yet"
                f" (supported: {names}); use a file quantized to one of those")
        bs = GGML_QUANT_SIZES[t.qtype][0]
        if t.shape[-1] % bs:
            raise ModelFormatError(f"{mf.path}: tensor {t.name} has a row of {t.shape[-1]} elements, not a multiple of {bs}")
