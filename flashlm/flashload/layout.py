"""The flash layout: a GGUF whose FFN weights are bundled by neuron for streaming.

"LLM in a flash"'s row-column bundling, for gated FFNs: neuron j's gate row, up row
and down column are what a token needs of it, so they are stored together and one
read fetches them. Neurons are bundled in groups of G consecutive ones (after an
optional permutation, the same for gate/up rows and down columns, so the model is
unchanged), G being the down projection's block size along the FFN dimension (32 for
the legacy formats, 256 for K-quants): the file's quantized blocks are kept as they
are, never re-quantized.

Layer N's bundles are one tensor `blk.N.ffn_bundles`, (n_groups, stride) bytes. Group
g's bundle is

    gate rows  [G x gate_row_bytes] | up rows [G x up_row_bytes]
    | down     [n_embd x down_bytes]  (the group's slice of each down row)
    | zero padding up to `stride`, a multiple of 4096

and the tensor starts 4096-aligned, so every bundle is one aligned direct-I/O read.
`blk.N.ffn_perm` (int32, n_ff) holds the permutation: bundle position p is the
source model's neuron perm[p] (the identity for now: moving a neuron to another group
would re-quantize the down blocks it shares). Everything else is copied as it is, metadata and
tokenizer included, so the file opens like the model it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..errors import FlashLMError, ModelFormatError
from ..runtime.modelfile import GGUFModelFile

VERSION = 1
KEY = "flashlm.flash"
ALIGN = 4096
FFN = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LayerBundles:
    """Where layer `layer`'s neuron bundles are and how they are cut."""

    layer: int
    group: int  # neurons per bundle
    n_ff: int
    n_embd: int
    types: tuple  # GGML types of gate, up, down
    gate_bytes: int  # one gate row
    up_bytes: int
    down_bytes: int  # one down row's slice for one group
    stride: int  # bytes per bundle in the file (aligned)

    @property
    def n_groups(self) -> int:
        return self.n_ff // self.group

    @property
    def parts(self) -> tuple[int, int, int]:
        """Bytes of a bundle's gate, up and down parts."""
        return self.group * self.gate_bytes, self.group * self.up_bytes, self.n_embd * self.down_bytes


def plan_layer(mf: GGUFModelFile, i: int) -> LayerBundles:
    """How layer i of a source model bundles; FlashLMError if it has no gated FFN."""
    try:
        gate, up, down = (mf.tensors[f"blk.{i}.{n}.weight"] for n in FFN)
    except KeyError:
        raise FlashLMError(f"{mf.path}: layer {i} has no gated FFN (ffn_gate/up/down); "
                           "the flash layout is for dense gated-FFN models") from None
    n_ff, n_embd = gate.shape
    bs, ts = GGML_QUANT_SIZES[down.qtype]
    if down.shape != (n_embd, n_ff) or up.shape != gate.shape or n_ff % bs:
        raise ModelFormatError(f"{mf.path}: layer {i}'s FFN shapes {gate.shape}, {up.shape}, {down.shape} do not match")
    gb, ub = gate.data.shape[1], up.data.shape[1]
    used = bs * (gb + ub) + n_embd * ts
    return LayerBundles(i, bs, n_ff, n_embd, (gate.qtype, up.qtype, down.qtype), gb, ub, ts,
                        -(-used // ALIGN) * ALIGN)


def bundle_group(mf: GGUFModelFile, lb: LayerBundles, g: int) -> np.ndarray:
    """Bundle g of layer lb.layer as bytes (lb.stride long, zero-padded)."""
    gate, up, down = (mf.tensors[f"blk.{lb.layer}.{n}.weight"] for n in FFN)
    G = lb.group
    out = np.zeros(lb.stride, dtype=np.uint8)
    a, b, c = lb.parts
    out[:a] = gate.data[g * G:(g + 1) * G].reshape(-1)
    out[a:a + b] = up.data[g * G:(g + 1) * G].reshape(-1)
    out[a + b:a + b + c] = down.data[:, g * lb.down_bytes:(g + 1) * lb.down_bytes].reshape(-1)
    return out


def convert(src: str | os.PathLike, out: str | os.PathLike, force: bool = False, progress=None) -> Path:
    """Write the flash layout of GGUF model `src` to `out`. Refuses to overwrite an
    existing `out` unless force. progress(done, total, what), if given, is called as
    tensors are written. Writes to out + ".partial" and renames at the end, so a
    failure leaves nothing half-written under the final name."""
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FlashLMError(f"{out} already exists; pass --force to overwrite it")
    if out.resolve() == src.resolve():
        raise FlashLMError("the output must be a different file from the model")
    mf = GGUFModelFile(src)
    if KEY + ".version" in mf.metadata:
        raise FlashLMError(f"{src} is already in the flash layout")
    n_layer = int(mf.metadata[f"{mf.arch}.block_count"])
    plans = [plan_layer(mf, i) for i in range(n_layer)]
    ffn_names = {f"blk.{i}.{n}.weight" for i in range(n_layer) for n in FFN}
    tmp = out.with_name(out.name + ".partial")
    w = GGUFWriter(str(tmp), mf.arch)
    try:
        _copy_metadata(mf, w)
        w.add_custom_alignment(ALIGN)
        w.add_uint32(KEY + ".version", VERSION)
        w.add_string(KEY + ".source", src.name)
        for lb in plans:
            w.add_array(f"{KEY}.blk.{lb.layer}.types", [int(t) for t in lb.types])
        items = []  # (name, byte shape, raw type, producer)
        for t in mf.tensors.values():
            if t.name not in ffn_names:
                items.append((t.name, t.data.shape, t.qtype, lambda t=t: np.ascontiguousarray(t.data)))
        for lb in plans:
            items.append((f"blk.{lb.layer}.ffn_perm", (lb.n_ff * 4,), GGMLQuantizationType.I32,
                          lambda lb=lb: np.arange(lb.n_ff, dtype=np.int32).view(np.uint8)))
            items.append((f"blk.{lb.layer}.ffn_bundles", (lb.n_groups, lb.stride), GGMLQuantizationType.I8,
                          lambda lb=lb: np.stack([bundle_group(mf, lb, g) for g in range(lb.n_groups)])))
        for name, shape, qtype, _ in items:
            nbytes = int(np.prod(shape))
            w.add_tensor_info(name, shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (name, _, _, make) in enumerate(items):
            w.write_tensor_data(make())
            if progress:
                progress(k + 1, len(items), name)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        mf.close()
    return out


def _copy_metadata(mf: GGUFModelFile, w: GGUFWriter) -> None:
    for key, field in mf.reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            vals = mf.array(key)
            vals = vals if isinstance(vals, list) else vals.tolist()
            w.add_key_value(key, vals, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)


def read_plans(mf: GGUFModelFile) -> list[LayerBundles]:
    """The bundle plan of each layer of a flash-layout file (ModelFormatError if the
    file is not one, or is of another version)."""
    version = mf.metadata.get(KEY + ".version")
    if version is None:
        raise ModelFormatError(f"{mf.path}: not a flash-layout file; make one with `flashlm convert MODEL --flash OUT`")
    if int(version) != VERSION:
        raise ModelFormatError(f"{mf.path}: flash layout version {version}, this flashlm reads {VERSION}; convert again")
    n_layer = int(mf.metadata[f"{mf.arch}.block_count"])
    n_embd = int(mf.metadata[f"{mf.arch}.embedding_length"])
    n_ff = int(mf.metadata[f"{mf.arch}.feed_forward_length"])
    plans = []
    for i in range(n_layer):
        t = mf.tensors.get(f"blk.{i}.ffn_bundles")
        if t is None:
            raise ModelFormatError(f"{mf.path}: flash layout without blk.{i}.ffn_bundles; convert again")
        n_groups, stride = t.data.shape
        plans.append(_infer_plan(mf, i, n_ff, n_embd, n_groups, stride))
    return plans


def _infer_plan(mf, i, n_ff, n_embd, n_groups, stride) -> LayerBundles:
    types = tuple(GGMLQuantizationType(int(x)) for x in mf.array(f"{KEY}.blk.{i}.types"))
    G = n_ff // n_groups
    gb = (n_embd // GGML_QUANT_SIZES[types[0]][0]) * GGML_QUANT_SIZES[types[0]][1]
    ub = (n_embd // GGML_QUANT_SIZES[types[1]][0]) * GGML_QUANT_SIZES[types[1]][1]
    db = (G // GGML_QUANT_SIZES[types[2]][0]) * GGML_QUANT_SIZES[types[2]][1]
    return LayerBundles(i, G, n_ff, n_embd, types, gb, ub, db, stride)
