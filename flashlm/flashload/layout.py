"""The flash layout: a GGUF whose FFN weights are bundled per neuron for streaming.

"LLM in a flash"'s row-column bundling, for gated FFNs: what a token needs of FFN
neuron j is its gate row, its up row and its down column, so they are stored together
and one read fetches them:

    blk.N.ffn_bundles   (n_ff, bundle_bytes): neuron j's record is
                        gate row j | up row j | down column j

Gate and up rows keep the file's quant blocks as they are. The down column cannot:
GGUF's down blocks run along the FFN dimension, 32 or 256 neurons to a block, so one
neuron's column is spread over blocks shared with its neighbours. Bundling whole
blocks (groups of 32 consecutive neurons) keeps the format, but measured on SmolLM2,
96-100% of such groups hold a neuron the token needs even when only 10% of neurons
are kept: no sparsity left to exploit. So the down projection is stored transposed,
one row per neuron, re-quantized to Q8_0 (8.5 bits; the added error is measured in
the tests). Adjacent neurons are adjacent records, so dense selections coalesce into
large reads.

    blk.N.ffn_neuron_ids     (n_ff,) int32: record k holds the source's neuron ids[k]
    blk.N.ffn_bundle_sums    (n_ff,) uint64 (stored as int32 pairs): record k's xxh3_64,
                             verified on every read (version 4)

Resident beside the bundles, for the sparsity predictors (predictor.py):
    blk.N.ffn_gate.weight    the gate matrix as it was (the "gate" predictor computes
                             the exact gate and keeps the neurons with large |act|)
    blk.N.ffn_gate_lr_a/b    a rank-r factorisation of the gate (the "lowrank" one)

Everything else, metadata and tokenizer included, is copied as it is; each layer's
bundle tensor starts 4096-aligned for direct I/O.

Neuron order (version 3): each layer's neurons are permuted, most often needed first.
The converter (runtime/convert.py) lets the model write a few hundred tokens of its own text from varied
prompts and counts how often the gate predictor keeps each neuron (`neuron_order`).
The same permutation applies to the records, the resident gate rows and the low-rank
factor's rows, so the model computes the same function. A store that keeps the
first records of a layer in DRAM then keeps its hottest neurons, and the neurons a
token still has to read are the contiguous tail, which coalesces into large reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

from .. import kernels_cpu
from ..errors import FlashLMError, ModelFormatError
from ..formats.modelfile import GGUFModelFile
from ..formats.validate import validate_flash_layout
from ..io.checksum import record_sums as checksums

VERSION = 4  # 4: record checksums
KEY = "flashlm.flash"
ALIGN = 4096
FFN = ("ffn_gate", "ffn_up", "ffn_down")
DOWN_TYPE = GGMLQuantizationType.Q8_0
ORDER_KEY = KEY + ".neuron_order"  # "calibrated" (most often needed first) or "identity"


@dataclass(frozen=True)
class LayerBundles:
    """How layer `layer`'s neuron records are laid out."""

    layer: int
    n_ff: int
    n_embd: int
    types: tuple  # GGML types of the gate rows, up rows, down rows (transposed down)
    gate_bytes: int  # one neuron's gate row
    up_bytes: int
    down_bytes: int

    @property
    def bundle_bytes(self) -> int:
        return self.gate_bytes + self.up_bytes + self.down_bytes


def _row_bytes(qtype, n: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n // bs * ts


def plan_layer(mf: GGUFModelFile, i: int) -> LayerBundles:
    """How layer i of a source model bundles; FlashLMError if it has no gated FFN."""
    try:
        gate, up, down = (mf.tensors[f"blk.{i}.{n}.weight"] for n in FFN)
    except KeyError:
        raise FlashLMError(f"{mf.path}: layer {i} has no gated FFN (ffn_gate/up/down); "
                           "the flash layout is for dense gated-FFN models") from None
    n_ff, n_embd = gate.shape
    if down.shape != (n_embd, n_ff) or up.shape != gate.shape or n_embd % 32:
        raise ModelFormatError(f"{mf.path}: layer {i}'s FFN shapes {gate.shape}, {up.shape}, {down.shape} do not match")
    return LayerBundles(i, n_ff, n_embd, (gate.qtype, up.qtype, DOWN_TYPE), gate.data.shape[1], up.data.shape[1],
                        _row_bytes(DOWN_TYPE, n_embd))


def neuron_ids(mf: GGUFModelFile, layer: int) -> np.ndarray:
    """The source's neuron id of each of layer `layer`'s records, (n_ff,) int64."""
    return np.asarray(mf.tensors[f"blk.{layer}.ffn_neuron_ids"].data).view(np.int32).reshape(-1).astype(np.int64)


def split_records(lb: LayerBundles, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of records rec (n, bundle_bytes): their gate rows, up rows, down rows."""
    a, b = lb.gate_bytes, lb.gate_bytes + lb.up_bytes
    return rec[:, :a], rec[:, a:b], rec[:, b:]


def layer_bundles(mf: GGUFModelFile, lb: LayerBundles) -> np.ndarray:
    """Layer lb.layer's records, (n_ff, bundle_bytes) uint8."""
    gate, up, down = (mf.tensors[f"blk.{lb.layer}.{n}.weight"] for n in FFN)
    down_t = np.ascontiguousarray(kernels_cpu.dequantize(down).T)
    out = np.empty((lb.n_ff, lb.bundle_bytes), dtype=np.uint8)
    g, u, d = split_records(lb, out)
    g[:], u[:], d[:] = gate.data, up.data, gguf_quants.quantize(down_t, DOWN_TYPE)
    return out


def lowrank_gate(mf: GGUFModelFile, layer: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """W_gate ~ B @ A from a truncated SVD: A (rank, n_embd), B (n_ff, rank), float16."""
    w = kernels_cpu.dequantize(mf.tensors[f"blk.{layer}.ffn_gate.weight"])
    u, s, vt = np.linalg.svd(w, full_matrices=False)  # float32: ample for a predictor, 2x faster
    return vt[:rank].astype(np.float16), (u[:, :rank] * s[:rank]).astype(np.float16)


def write_layout(mf: GGUFModelFile, src: Path, tmp: Path, rank: int | None = None, progress=None,
                 calibrated: bool = False) -> list[LayerBundles]:
    """Write the flash layout of the GGUF `mf` (read from `src`) to `tmp`, its neurons in
    the source's order (`calibrated` records that the caller will permute them;
    permute_neurons). rank: of the low-rank gate predictor (default n_embd / 8).
    progress(done, total, what) is called as tensors are written. Returns the plans."""
    if KEY + ".version" in mf.metadata:
        raise FlashLMError(f"{src} is already in the flash layout")
    n_layer = int(mf.metadata[f"{mf.arch}.block_count"])
    plans = [plan_layer(mf, i) for i in range(n_layer)]
    rank = rank or max(8, plans[0].n_embd // 8)
    moved = {f"blk.{lb.layer}.{n}.weight" for lb in plans for n in ("ffn_up", "ffn_down")}
    items = []  # (name, byte shape, raw type, producer)
    for t in mf.tensors.values():
        if t.name not in moved:
            items.append((t.name, t.data.shape, t.qtype, lambda t=t: np.ascontiguousarray(t.data)))
    lowrank, made = {}, {}

    def bundles(lb):  # a layer's records, made once for them and their checksums
        if lb.layer not in made:
            made.clear()
            made[lb.layer] = layer_bundles(mf, lb)
        return made[lb.layer]

    def lr(i, k):
        if i not in lowrank:
            lowrank.clear()
            lowrank[i] = lowrank_gate(mf, i, rank)
        return lowrank[i][k].view(np.uint8)

    for lb in plans:
        i = lb.layer
        items.append((f"blk.{i}.ffn_gate_lr_a", (rank, lb.n_embd * 2), GGMLQuantizationType.F16, lambda i=i: lr(i, 0)))
        items.append((f"blk.{i}.ffn_gate_lr_b", (lb.n_ff, rank * 2), GGMLQuantizationType.F16, lambda i=i: lr(i, 1)))
        items.append((f"blk.{i}.ffn_bundles", (lb.n_ff, lb.bundle_bytes), GGMLQuantizationType.I8,
                      lambda lb=lb: bundles(lb)))
        items.append((f"blk.{i}.ffn_bundle_sums", (lb.n_ff, 8), GGMLQuantizationType.I32,
                      lambda lb=lb: checksums(bundles(lb)).view(np.uint8).reshape(lb.n_ff, 8)))
        items.append((f"blk.{i}.ffn_neuron_ids", (lb.n_ff, 4), GGMLQuantizationType.I32,
                      lambda lb=lb: np.arange(lb.n_ff, dtype=np.int32).view(np.uint8).reshape(lb.n_ff, 4)))
    w = GGUFWriter(str(tmp), mf.arch)
    try:
        _copy_metadata(mf, w)
        w.add_custom_alignment(ALIGN)
        w.add_uint32(KEY + ".version", VERSION)
        w.add_string(KEY + ".source", src.name)
        st = src.stat()
        w.add_uint64(KEY + ".source_size", st.st_size)
        w.add_uint64(KEY + ".source_mtime_ns", st.st_mtime_ns)
        w.add_string(ORDER_KEY, "calibrated" if calibrated else "identity")
        w.add_array(KEY + ".up_types", [int(lb.types[1]) for lb in plans])
        for name, shape, qtype, _ in items:
            w.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (name, _, _, make) in enumerate(items):
            w.write_tensor_data(make())
            if progress:
                progress(k + 1, len(items), name)
    finally:
        w.close()
    return plans


def is_current(out: Path, src: Path) -> bool:
    """Whether flash file `out` was written by this layout version from `src` as it is now
    (its size and modification time)."""
    mf = GGUFModelFile(out)
    try:
        md, st = mf.metadata, src.stat()
        return (md.get(KEY + ".version") == VERSION and md.get(KEY + ".source_size") == st.st_size
                and md.get(KEY + ".source_mtime_ns") == st.st_mtime_ns)
    finally:
        mf.close()


def permute_neurons(path: str | os.PathLike, orders: list[np.ndarray]) -> None:
    """Reorder each layer's neurons of flash file `path` in place: records, resident gate
    rows and the low-rank factor's rows alike (the model's function is unchanged)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    tensors = {t.name: t.data for t in reader.tensors}
    for i, order in enumerate(orders):
        for name in (f"blk.{i}.ffn_bundles", f"blk.{i}.ffn_bundle_sums", f"blk.{i}.ffn_gate.weight",
                     f"blk.{i}.ffn_gate_lr_b", f"blk.{i}.ffn_neuron_ids"):
            d = tensors[name]
            if d.shape[0] != len(order):
                raise FlashLMError(f"{path}: {name} has {d.shape[0]} rows, not {len(order)} neurons")
            d[:] = d[order]
    reader.data.flush()


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
    """The record layout of each layer of a flash-layout file (ModelFormatError if the
    file is not one, or is of another version)."""
    version = mf.metadata.get(KEY + ".version")
    if version is None:
        raise ModelFormatError(f"{mf.path}: not a flash-layout file; make one with `flashlm convert MODEL --flash OUT`")
    validate_flash_layout(mf)
    if int(version) != VERSION:
        raise ModelFormatError(f"{mf.path}: flash layout version {version}, this flashlm reads {VERSION}; convert again")
    plans = []
    for i in range(int(mf.metadata[f"{mf.arch}.block_count"])):
        gate, bundles = mf.tensors.get(f"blk.{i}.ffn_gate.weight"), mf.tensors.get(f"blk.{i}.ffn_bundles")
        if gate is None or bundles is None:
            raise ModelFormatError(f"{mf.path}: flash layout without layer {i}'s gate or bundles; convert again")
        n_ff, n_embd = gate.shape
        lb = LayerBundles(i, n_ff, n_embd, (gate.qtype, _up_type(mf, i), DOWN_TYPE), gate.data.shape[1], 0,
                          _row_bytes(DOWN_TYPE, n_embd))
        up_bytes = bundles.data.shape[1] - lb.gate_bytes - lb.down_bytes
        plans.append(LayerBundles(i, n_ff, n_embd, lb.types, lb.gate_bytes, up_bytes, lb.down_bytes))
    return plans


def record_sums(mf: GGUFModelFile, layer: int) -> np.ndarray:
    """Layer `layer`'s record checksums, (n_ff,) uint64, a copy in memory."""
    t = mf.tensors.get(f"blk.{layer}.ffn_bundle_sums")
    if t is None or t.nbytes % 8:
        raise ModelFormatError(f"{mf.path}: flash layout without layer {layer}'s record checksums; convert again")
    return np.frombuffer(t.data.tobytes(), dtype="<u8").astype(np.uint64)


def _up_type(mf: GGUFModelFile, i: int):
    types = mf.array(f"{KEY}.up_types")
    if types is None or len(types) <= i:
        raise ModelFormatError(f"{mf.path}: flash layout without {KEY}.up_types; convert again")
    return GGMLQuantizationType(int(types[i]))
