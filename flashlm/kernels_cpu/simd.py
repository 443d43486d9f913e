"""256-bit integer SIMD for Numba kernels: llama.cpp's dot-product recipe, in Python.

Numba has no vector types, and its auto-vectorizer cannot find the instructions
llama.cpp's speed rests on (x86's `vpmaddubsw`: 32 u8 x i8 products summed in pairs;
`vpmaddwd`: i16 pairs summed into i32 with a scale). So this module gives Numba three
LLVM vector types and a small set of operations on them, as `@intrinsic`s that are
inlined into the calling kernel:

    V32b  <32 x i8>    weight codes or activations, one 32-element block
    V8i   <8 x i32>    integer partial sums
    V8f   <8 x float>  a row's float accumulator, summed once at its end

Kernels then read like ggml-quants.c's AVX2 code: load a block, unpack its codes,
`dot_us` it with the int8 activations, scale, accumulate, and reduce once per row.

Two code paths behind one interface:
- "avx2": x86's own intrinsics (`llvm.x86.avx2.*`), chosen when the host has AVX2;
- "generic": plain LLVM vector IR that any target compiles (ARM, older x86).

`FLASHLM_SIMD=generic` forces the portable path (tests check both give the same);
`FLASHLM_SIMD=avx2` keeps AVX2 but not VNNI's `vpdpbusd` (see `VNNI`).

Value ranges the callers keep (as llama.cpp does): `dot_us`'s unsigned operand is at
most 255 and a pair of its products fits int16 (6-bit codes times int8: 16002).
"""

import inspect

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from ..target import TARGET


# The path and VNNI are the target's (flashlm/target.py), decided before numba compiled
# anything. vpdpbusd (u8 x i8 products summed in fours, added to i32 lanes, one
# instruction) is the prefill GEMM's core; without it `dpbusd` is emulated exactly.
MODE, VNNI = TARGET.mode, TARGET.vnni

_I1, _I8, _I16, _I32 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()
_LB = ir.VectorType(_I8, 32)
_LH = ir.VectorType(_I8, 16)
_LW = ir.VectorType(_I16, 16)
_LI = ir.VectorType(_I32, 8)
_LF = ir.VectorType(_F32, 8)


class V32b(types.Type):
    def __init__(self):
        super().__init__(name="V32b")


class V8i(types.Type):
    def __init__(self):
        super().__init__(name="V8i")


class V8f(types.Type):
    def __init__(self):
        super().__init__(name="V8f")


v32b, v8i, v8f = V32b(), V8i(), V8f()


@register_model(V32b)
class _ModelB(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LB)


@register_model(V8i)
class _ModelI(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LI)


@register_model(V8f)
class _ModelF(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LF)


# -- IR helpers ----------------------------------------------------------------------


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count),
                                                                                  [0] * vty.count))


def _const(vty, value):
    return ir.Constant(vty, [value] * vty.count)


def _ptr(context, builder, aryty, ary, idx):
    a = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, a, [idx], wraparound=False)


def _pairs(builder, v, n):
    """Sum adjacent lanes of an n-lane vector: n/2 lanes (lane i = v[2i] + v[2i+1])."""
    even = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def _maddubs(builder, u, s):
    """u8 x i8 products, adjacent pairs summed into i16 (vpmaddubsw; no saturation is
    reached within the callers' ranges)."""
    if MODE == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _LW, [u, s])
    p = builder.mul(builder.zext(u, ir.VectorType(_I16, 32)), builder.sext(s, ir.VectorType(_I16, 32)))
    return _pairs(builder, p, 32)


def _maddwd(builder, h, k):
    """i16 x i16 products, adjacent pairs summed into i32 (vpmaddwd)."""
    if MODE == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _LI, [h, k])
    p = builder.mul(builder.sext(h, ir.VectorType(_I32, 16)), builder.sext(k, ir.VectorType(_I32, 16)))
    return _pairs(builder, p, 16)


def _lane_op(name, ret, emit, doc):
    """An intrinsic on vector values whose IR is emit(builder, *values). Its arity is
    emit's (Numba needs it spelled out: it cannot lower a *args intrinsic)."""
    def codegen(context, builder, sig, args):
        return emit(builder, *args)

    def typer(typingctx, *args):
        return ret(*args), codegen

    arity = len(inspect.signature(emit).parameters) - 1
    param = inspect.Parameter.POSITIONAL_OR_KEYWORD
    typer.__signature__ = inspect.Signature([inspect.Parameter("typingctx", param)]
                                            + [inspect.Parameter(f"a{i}", param) for i in range(arity)])
    typer.__name__, typer.__doc__ = name, doc
    return intrinsic(typer)


# -- loads and unpacking -------------------------------------------------------------


def _loader(name, vty, ret, align, doc):
    """An intrinsic (arr, off) loading one vector of type vty from &arr[off]."""
    def typer(typingctx, arr, off):
        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1])
            return builder.load(builder.bitcast(p, vty.as_pointer()), align=align)

        return ret(arr, off), codegen

    typer.__name__, typer.__doc__ = name, doc
    return intrinsic(typer)


load32 = _loader("load32", _LB, v32b, 1, "The 32 bytes arr[off:off + 32] (a uint8 or int8 array).")
load8f = _loader("load8f", _LF, v8f, 4, "The 8 floats arr[off:off + 8].")


@intrinsic
def load8s(typingctx, arr, off):
    """The 8 signed bytes arr[off:off + 8] (a uint8 array holding int8 codes) as int32 lanes."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.sext(builder.load(builder.bitcast(p, ir.VectorType(_I8, 8).as_pointer()), align=1), _LI)

    return v8i(arr, off), codegen


@intrinsic
def load_nibbles(typingctx, arr, off):
    """The 16 bytes arr[off:off + 16] as 32 codes: their low nibbles, then their high
    nibbles (a legacy block's element order)."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        h = builder.load(builder.bitcast(p, _LH.as_pointer()), align=1)
        lo = builder.and_(h, _const(_LH, 15))
        hi = builder.lshr(h, _const(_LH, 4))
        return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))

    return v32b(arr, off), codegen


low_nibbles = _lane_op("low_nibbles", v32b, lambda b, v: b.and_(v, _const(_LB, 15)), "v & 15 in each lane.")
high_nibbles = _lane_op("high_nibbles", v32b, lambda b, v: b.lshr(v, _const(_LB, 4)), "v >> 4 in each lane.")
vor = _lane_op("vor", v32b, lambda b, x, y: b.or_(x, y), "x | y in each lane.")


@intrinsic
def bits_to_16s(typingctx, word):
    """Bit i of a 32-bit word as 16 or 0 in lane i (a Q5 block's fifth bits)."""
    def codegen(context, builder, sig, args):
        w = context.cast(builder, args[0], sig.args[0], types.uint32)
        m = builder.bitcast(w, ir.VectorType(_I1, 32))
        return builder.shl(builder.zext(m, _LB), _const(_LB, 4))

    return v32b(word), codegen


@intrinsic
def field_shl4(typingctx, v, shift, mask):
    """((v >> shift) & mask) << 4 in each lane: high bits of Q5_K/Q6_K codes moved into place."""
    def codegen(context, builder, sig, args):
        s = _splat(builder, context.cast(builder, args[1], sig.args[1], types.uint8), _LB)
        m = _splat(builder, context.cast(builder, args[2], sig.args[2], types.uint8), _LB)
        return builder.shl(builder.and_(builder.lshr(args[0], s), m), _const(_LB, 4))

    return v32b(v, shift, mask), codegen


@intrinsic
def sub_each(typingctx, v, k):
    """v - k in each lane, wrapping (unsigned codes to signed: nibble - 8)."""
    def codegen(context, builder, sig, args):
        return builder.sub(args[0], _splat(builder, context.cast(builder, args[1], sig.args[1], types.uint8), _LB))

    return v32b(v, k), codegen


# -- products and sums ---------------------------------------------------------------


@intrinsic
def dot_us(typingctx, u, s, k_lo, k_hi):
    """Unsigned codes u . int8 activations s, in 8 int32 lanes; products of the first 16
    elements weighted by k_lo, of the last 16 by k_hi (per-16 scales; pass 1, 1 for none)."""
    def codegen(context, builder, sig, args):
        u, s, k_lo, k_hi = args
        h = _maddubs(builder, u, s)
        lo = _splat(builder, context.cast(builder, k_lo, sig.args[2], types.int16), ir.VectorType(_I16, 8))
        hi = _splat(builder, context.cast(builder, k_hi, sig.args[3], types.int16), ir.VectorType(_I16, 8))
        k = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
        return _maddwd(builder, h, k)

    return v8i(u, s, k_lo, k_hi), codegen


@intrinsic
def dot_ss(typingctx, a, b):
    """int8 a . int8 b in 8 int32 lanes (x86: |a| . sign(a)*b, as llama.cpp does)."""
    def codegen(context, builder, sig, args):
        a, b = args
        if MODE == "avx2":
            ua = _call(builder, "llvm.abs.v32i8", _LB, [a, ir.Constant(_I1, 0)])
            sb = _call(builder, "llvm.x86.avx2.psign.b", _LB, [b, a])
            h = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _LW, [ua, sb])
            return _maddwd(builder, h, _const(_LW, 1))
        p = builder.mul(builder.sext(a, ir.VectorType(_I16, 32)), builder.sext(b, ir.VectorType(_I16, 32)))
        return _maddwd(builder, _pairs(builder, p, 32), _const(_LW, 1))

    return v8i(a, b), codegen


@intrinsic
def dpbusd(typingctx, acc, u, s):
    """acc + (the products u[4i..4i+3] . s[4i..4i+3] summed) in int32 lane i: unsigned
    codes u, int8 activations s (vpdpbusd; exact, no saturation)."""
    def codegen(context, builder, sig, args):
        acc, u, s = args
        if VNNI:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _LI,
                         [acc, builder.bitcast(u, _LI), builder.bitcast(s, _LI)])
        p = builder.mul(builder.zext(u, ir.VectorType(_I32, 32)), builder.sext(s, ir.VectorType(_I32, 32)))
        p = _pairs(builder, _pairs(builder, p, 32), 16)
        return builder.add(acc, p)

    return v8i(acc, u, s), codegen


@intrinsic
def dpbusd7(typingctx, acc, u, s):
    """dpbusd for codes u below 128 (every weight type's but Q8_0's): vpdpbusd with VNNI;
    on AVX2 vpmaddubsw and vpmaddwd (llama.cpp's AVX2 recipe: a pair of products is at
    most 2 * 127 * 128, inside int16, so it is exact too), three instructions where the
    exact emulation of dpbusd takes a dozen."""
    def codegen(context, builder, sig, args):
        acc, u, s = args
        if VNNI:
            return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _LI,
                         [acc, builder.bitcast(u, _LI), builder.bitcast(s, _LI)])
        return builder.add(acc, _maddwd(builder, _maddubs(builder, u, s), _const(_LW, 1)))

    return v8i(acc, u, s), codegen


@intrinsic
def bcast4(typingctx, arr, off):
    """The 4 bytes arr[off:off + 4] repeated in all 8 lanes of 32 bytes."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        w = builder.load(builder.bitcast(p, _I32.as_pointer()), align=1)
        return builder.bitcast(_splat(builder, w, _LI), _LB)

    return v32b(arr, off), codegen


@intrinsic
def store8f(typingctx, arr, off, v):
    """arr[off:off + 8] = the 8 lanes of v (a float32 array)."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, _LF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, off, v), codegen


@intrinsic
def scale2(typingctx, v, a, s, c, z, acc):
    """acc + float(v) * (a * s) + c * z, lane by lane (a, c vectors; s, z scalars): a
    block's integer sums scaled by weight and activation scales, plus its offset term."""
    def codegen(context, builder, sig, args):
        v, a, s, c, z, acc = args
        sv = _splat(builder, context.cast(builder, s, sig.args[2], types.float32), _LF)
        zv = _splat(builder, context.cast(builder, z, sig.args[4], types.float32), _LF)
        acc = _call(builder, "llvm.fma.v8f32", _LF, [builder.sitofp(v, _LF), builder.fmul(a, sv), acc])
        return _call(builder, "llvm.fma.v8f32", _LF, [c, zv, acc])

    return v8f(v, a, s, c, z, acc), codegen


zeros_i = _lane_op("zeros_i", v8i, lambda b: _const(_LI, 0), "Eight int32 zeros.")
zeros_f = _lane_op("zeros_f", v8f, lambda b: _const(_LF, 0.0), "Eight float zeros.")
add_i = _lane_op("add_i", v8i, lambda b, x, y: b.add(x, y), "x + y in each int32 lane.")


@intrinsic
def fma_i(typingctx, v, scale, acc):
    """acc + float(v) * scale, lane by lane."""
    def codegen(context, builder, sig, args):
        v, scale, acc = args
        s = _splat(builder, context.cast(builder, scale, sig.args[1], types.float32), _LF)
        return _call(builder, "llvm.fma.v8f32", _LF, [builder.sitofp(v, _LF), s, acc])

    return v8f(v, scale, acc), codegen


@intrinsic
def hsum(typingctx, v):
    """The sum of a float vector's 8 lanes."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fadd.v8f32", _F32, [ir.Constant(_F32, 0.0), args[0]])

    return types.float32(v), codegen
