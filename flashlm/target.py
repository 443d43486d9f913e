"""The machine the kernels are compiled for: the SIMD path (kernels_cpu/simd.py) and the
CPU that numba's LLVM targets, decided once, before numba compiles anything.

Numba keys its cache of machine code on the target CPU's name and feature list. Left to
itself it targets the exact host ("znver4", a list of 80 features), so a cache built on
one machine is never valid on another, and the first run of every install compiles the
kernels for a minute or more. flashlm instead names a portable baseline for each SIMD
path it has, the CPUs those paths need and no more:

    path     vnni   numba's target                    CPUs
    avx2     512    x86-64-v4 +avx512vnni             Ice Lake, Sapphire Rapids, Zen 4/5
    avx2     avx    x86-64-v3 +avxvnni                Alder Lake, Meteor Lake, Arrow Lake
    avx2     -      x86-64-v3                         Haswell (2013) and later, Zen 1-3
    generic  -      the host's own (numba's default)   other CPUs, FLASHLM_SIMD=generic
                                                      (no prebuilt code; "x86-64" lacks
                                                      F16C, whose half-float conversion
                                                      numba's JIT cannot link as a libcall)

so that compiled kernels are portable among CPUs of one row: a wheel can carry them
(kernels_cpu/prebuilt.py) and a first run loads them instead of compiling. The kernels
themselves decide nothing: they ask `MODE` and `VNNI` here.

`FLASHLM_SIMD=generic|avx2` forces a path (avx2 without VNNI's vpdpbusd). A user's own
NUMBA_CPU_NAME wins: then the host target is numba's and the path the portable one,
which compiles for any target.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    mode: str  # kernels_cpu/simd.py's path: "avx2" or "generic"
    vnni: bool  # vpdpbusd on 256-bit vectors (AVX512-VNNI with VL, or AVX-VNNI)
    cpu_name: str | None  # numba's NUMBA_CPU_NAME (None: the host's)
    cpu_features: str | None  # numba's NUMBA_CPU_FEATURES

    @property
    def tag(self) -> str:
        """A short name of the compiled code's target, for caches and reports."""
        if self.cpu_name is None:
            return "host-" + self.mode
        return self.cpu_name + (self.cpu_features or "").replace(",", "")


def _host_features() -> dict:
    try:
        import llvmlite.binding as llvm

        return dict(llvm.get_host_cpu_features())
    except Exception:  # noqa: BLE001  (a platform llvmlite cannot query)
        return {}


def pick(env=os.environ, feats: dict | None = None) -> Target:
    """The target for this host (feats: llvmlite's host CPU features) and environment."""
    feats = _host_features() if feats is None else feats
    forced = env.get("FLASHLM_SIMD", "").strip().lower()
    users = env.get("NUMBA_CPU_NAME") and env.get("FLASHLM_NUMBA_TARGET") != env.get("NUMBA_CPU_NAME")
    if users or forced == "generic" or not feats.get("avx2") or not feats.get("fma"):
        return Target("generic", False, None, None)
    if forced != "avx2":
        if feats.get("avx512vnni") and feats.get("avx512vl") and feats.get("avx512bw"):
            return Target("avx2", True, "x86-64-v4", "+avx512vnni")
        if feats.get("avxvnni"):
            return Target("avx2", True, "x86-64-v3", "+avxvnni")
    return Target("avx2", False, "x86-64-v3", "")


def _numba_compiled_already() -> bool:
    """Whether numba's CPU target was set up before flashlm was imported (the user's own
    @njit code): its machine code is then the host's, and stays so."""
    registry = sys.modules.get("numba.core.registry")
    return registry is not None and "_toplevel_target_context" in vars(registry.cpu_target)


def _configure() -> Target:
    t = pick()
    if t.cpu_name is None or _numba_compiled_already():
        if t.cpu_name is not None:  # the host's code under a portable name would poison the cache
            t = Target(t.mode, t.vnni, None, None)
        return t
    os.environ["NUMBA_CPU_NAME"] = os.environ["FLASHLM_NUMBA_TARGET"] = t.cpu_name  # (the mark: ours, not the
    # user's, in a child process that inherits it)
    os.environ["NUMBA_CPU_FEATURES"] = t.cpu_features
    if "numba" in sys.modules:  # imported already (its config read the environment then)
        config = sys.modules["numba"].config
        config.CPU_NAME, config.CPU_FEATURES = t.cpu_name, t.cpu_features
    return t


TARGET = _configure()
MODE, VNNI = TARGET.mode, TARGET.vnni
