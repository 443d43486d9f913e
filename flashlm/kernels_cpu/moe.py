"""A mixture of experts' compiled kernels: one token's routing (this layer's router, and
the next layer's to prefetch) and its experts' FFNs, whole or in parts (the cached experts
while the others are read), for experts/moe.py."""

import numpy as np
from numba import njit, prange

from .acts import _act_block, _mv, _n_blocks, _n_sums, _prep
from .layer import _act
from .qdot import dot16, rows4
from .quants import _F32


@njit(nogil=True, cache=True)
def moe_route(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p):
    """One token's routing, as experts/moe.route: p = softmax (or sigmoid) of the router
    W (n_expert, row_bytes) times x; ids (k,) the k most probable experts, best first
    (ties: the lower id); wts their probabilities, / their sum if norm, * scale if set."""
    n = w.shape[0]
    if qtype == _F32:  # a float32 router (the usual): rows straight from the mapping
        _f32_rows(w, x, p)
    else:
        _mv(qtype, w, x, p, lut, 1, all_rows)
    if sigmoid:
        for i in range(n):
            p[i] = np.float32(1.0) / (np.float32(1.0) + np.float32(np.exp(-p[i])))
    else:
        m = p[0]
        for i in range(1, n):
            m = max(m, p[i])
        tot = np.float32(0.0)
        for i in range(n):
            p[i] = np.float32(np.exp(p[i] - m))
            tot += p[i]
        for i in range(n):
            p[i] = p[i] / tot
    taken = np.zeros(n, dtype=np.bool_)
    tot = np.float32(0.0)
    for j in range(ids.shape[0]):  # the k largest in turn, ties to the lower id (a stable sort's order; NaN last)
        b = -1
        for i in range(n):
            if not taken[i] and (b < 0 or p[i] > p[b] or (p[b] != p[b] and p[i] == p[i])):
                b = i
        taken[b] = True
        ids[j] = b
        wts[j] = p[b]
        tot += wts[j]
    if norm:
        d = max(tot, np.float32(6.103515625e-5))  # llama.cpp's clamp
        for j in range(ids.shape[0]):
            wts[j] = wts[j] / d
    if scale != 0.0:
        for j in range(ids.shape[0]):
            wts[j] = wts[j] * np.float32(scale)


@njit(nogil=True, cache=True)
def moe_route_rows(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p):
    """moe_route for each token of x (T, n_embd): ids, wts (T, k) and p (T, n_expert), the
    routing of a prompt's tokens as of one token's."""
    for t in range(x.shape[0]):
        moe_route(w, qtype, x[t], sigmoid, norm, scale, lut, all_rows, ids[t], wts[t], p[t])


@njit(inline="always")
def _f32_rows(w, x, out):
    """out = W @ x for a float32 W (rows of bytes) read in place, each row as _float_row
    sums it (dot16: the same float32 result), with no copy of the row."""
    acc = np.empty(16, dtype=np.float32)
    for r in range(w.shape[0]):
        out[r] = dot16(w[r].view(np.float32), x, acc)


@njit(nogil=True, cache=True)
def moe_route_ahead(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p, w2, qtype2, all_rows2, ids2,
                    wts2, p2):
    """moe_route for this layer's router w, and the next layer's router w2 on the same x
    (ids2: its k most probable experts, to prefetch): one call instead of two."""
    moe_route(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p)
    moe_route(w2, qtype2, x, sigmoid, norm, scale, lut, all_rows2, ids2, wts2, p2)


@njit(inline="always")
def _act_bufs(t, n):
    """Room for t activation vectors of n in every form _prep writes: (xr, xq, xd, xs, isum)."""
    return (np.empty((t, n), dtype=np.float32), np.empty((t, n), dtype=np.int8),
            np.empty((t, n // 32 + 1), dtype=np.float32), np.empty((t, n // 32 + 1), dtype=np.float32),
            np.empty((t, n // 16 + 1), dtype=np.int32))


@njit(inline="always")
def _row_bufs(n):
    """One thread's rows4 arguments: (rows, next rows, results, float scratch of n)."""
    return (np.empty(4, dtype=np.int64), np.empty(4, dtype=np.int64), np.empty(4, dtype=np.float32),
            np.empty(n, dtype=np.float32))


@njit(inline="always")
def _group4(i0, n, r4, p4):
    """Rows i0..i0+3 and the 4 after them (to prefetch), clamped to n rows."""
    for q in range(4):
        r4[q] = min(i0 + q, n - 1)
        p4[q] = min(i0 + 4 + q, n - 1)


@njit(nogil=True, cache=True)
def moe_decode(buf, offs, shapes, qts, x, w, gelu, lut, nt, all_rows, out):
    """out += sum_j w[j] * down_j(act(gate_j x) * up_j x): one token's routed experts.
    Expert j's gate, up and down matrices start at byte offsets offs[j] of buf;
    shapes[p] = (rows, row_bytes) and qts[p] = GGML type of part p (gate, up, down)."""
    k = offs.shape[0]
    y = np.empty((k, shapes[2, 0]), dtype=np.float32)
    moe_experts(buf, offs, np.arange(k), shapes, qts, x, gelu, lut, nt, all_rows, y)
    moe_combine(y, w, out)


@njit(nogil=True, cache=True)
def moe_combine(y, w, out):
    """out += sum_j w[j] * y[j], each output summed over the experts in order (as
    adding each expert's down product to out would)."""
    for i in range(out.shape[0]):
        acc = out[i]
        for j in range(y.shape[0]):
            acc += w[j] * y[j, i]
        out[i] = acc


@njit(nogil=True, cache=True, parallel=True)
def moe_experts(buf, offs, sel, shapes, qts, x, gelu, lut, nt, all_rows, y):
    """y[j] = down_j(act(gate_j x) * up_j x) for the experts j in sel (offsets offs[j] of
    buf, as moe_decode): a token's experts in parts, so the cached ones compute while
    the others are read; moe_combine then sums them in order, as one call would.

    Three parallel loops, not three per expert: every expert's gate and up rows, then
    each expert's activation (quantized for down's type), then each output row's down
    products for every expert."""
    k = sel.shape[0]
    n_in = x.shape[0]
    n_ff = shapes[0, 0]
    n_out = shapes[2, 0]
    # x as gate (0) and up (1) read it
    xx = np.empty((2, n_in), dtype=np.float32)
    xx[0] = x
    xx[1] = x
    xr, xq, xd, xs, xi = _act_bufs(2, n_in)
    for p in range(2):
        _prep(qts[p], xx, p, xr, xq, xd, xs, xi)
    nb0, nb1 = _n_blocks(qts[0], n_in), _n_blocks(qts[1], n_in)
    ns0, ns1 = _n_sums(qts[0], n_in), _n_sums(qts[1], n_in)
    gu = np.empty((2, k, n_ff), dtype=np.float32)
    groups = (n_ff + 3) // 4
    tasks = 2 * k * groups
    n_chunks = max(1, min(tasks, 4 * nt))
    step = (tasks + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r4, p4, o4, scratch = _row_bufs(n_in)
        for t in range(c * step, min(tasks, (c + 1) * step)):
            p = t // (k * groups)
            j = t // groups % k
            i0 = 4 * (t % groups)
            _group4(i0, n_ff, r4, p4)
            qt = qts[p]
            nb = nb0 if p == 0 else nb1
            ns = ns0 if p == 0 else ns1
            rows4(qt, _part(buf, offs[sel[j], p], shapes[p]), r4, p4, xr[p], xq[p], xd[p, :nb], xs[p, :nb],
                  xi[p, :ns], o4, scratch, lut, _act_block(qt) == 0)
            for q in range(min(4, n_ff - i0)):
                gu[p, j, i0 + q] = o4[q]
    # each expert's activation, as down reads it
    qd = qts[2]
    a = np.empty((k, n_ff), dtype=np.float32)
    ar, aq, ad, as_, ai = _act_bufs(k, n_ff)
    for j in prange(k):
        for i in range(n_ff):
            gi = gu[0, j, i]
            a[j, i] = _act(gi, gelu, lut) * gu[1, j, i]
        _prep(qd, a, j, ar, aq, ad, as_, ai)
    nbd, nsd = _n_blocks(qd, n_ff), _n_sums(qd, n_ff)
    groups = (n_out + 3) // 4
    n_chunks = max(1, min(groups, 4 * nt))
    step = (groups + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r4, p4, o4, scratch = _row_bufs(n_ff)
        for g in range(c * step, min(groups, (c + 1) * step)):
            i0 = 4 * g
            _group4(i0, n_out, r4, p4)
            for j in range(k):
                rows4(qd, _part(buf, offs[sel[j], 2], shapes[2]), r4, p4, ar[j], aq[j], ad[j, :nbd], as_[j, :nbd],
                      ai[j, :nsd], o4, scratch, lut, nbd == 0)
                for q in range(min(4, n_out - i0)):
                    y[sel[j], i0 + q] = o4[q]


@njit(inline="always")
def _part(buf, o, shape):
    return buf[o:o + shape[0] * shape[1]].reshape((shape[0], shape[1]))
