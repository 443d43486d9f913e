"""The kernels' compile target (flashlm/target.py) and the compiled kernels a wheel
carries (kernels_cpu: seeding numba's cache from flashlm/_prebuilt)."""

import json
import subprocess
import sys

import numba
import pytest

from flashlm import kernels_cpu
from flashlm.target import TARGET, Target, pick

ZEN4 = {"sse2": True, "avx2": True, "fma": True, "avx512f": True, "avx512bw": True, "avx512vl": True,
        "avx512vnni": True}
ALDER_LAKE = {"sse2": True, "avx2": True, "fma": True, "avxvnni": True}
HASWELL = {"sse2": True, "avx2": True, "fma": True}
SANDY_BRIDGE = {"sse2": True, "avx": True}
ARM = {"neon": True}


@pytest.mark.parametrize("feats, env, want", [
    (ZEN4, {}, Target("avx2", True, "x86-64-v4", "+avx512vnni")),
    (ALDER_LAKE, {}, Target("avx2", True, "x86-64-v3", "+avxvnni")),
    (HASWELL, {}, Target("avx2", False, "x86-64-v3", "")),
    (SANDY_BRIDGE, {}, Target("generic", False, None, None)),
    (ARM, {}, Target("generic", False, None, None)),
    (ZEN4, {"FLASHLM_SIMD": "avx2"}, Target("avx2", False, "x86-64-v3", "")),
    (ZEN4, {"FLASHLM_SIMD": "generic"}, Target("generic", False, None, None)),
    (ALDER_LAKE, {"FLASHLM_SIMD": "avx2"}, Target("avx2", False, "x86-64-v3", "")),
    # a user's own target CPU for numba wins: the portable path, on numba's host target
    (ZEN4, {"NUMBA_CPU_NAME": "skylake"}, Target("generic", False, None, None)),
    # one flashlm set for a parent process is not the user's
    (ZEN4, {"NUMBA_CPU_NAME": "x86-64-v3", "FLASHLM_NUMBA_TARGET": "x86-64-v3"},
     Target("avx2", True, "x86-64-v4", "+avx512vnni")),
])
def test_each_cpu_gets_the_portable_target_of_its_simd_path(feats, env, want):
    assert pick(env, feats) == want


def test_numba_compiles_for_the_target():
    """numba's cache key names the portable target, so code compiled on one CPU of a path
    is valid on every other: in a fresh process, as a user's would be."""
    code = ("import flashlm, json; from numba.core.registry import cpu_target; "
            "print(json.dumps(cpu_target.target_context.codegen().magic_tuple()[1:]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    name, features = json.loads(out)
    if TARGET.cpu_name is None:
        assert name == numba.config.CPU_NAME or name
    else:
        assert (name, features) == (TARGET.cpu_name, TARGET.cpu_features)


def _fake_prebuilt(root, **manifest):
    sub = root / "kernels_cpu"
    sub.mkdir(parents=True)
    for f in ("qdot.f-1.py311.nbi", "qdot.f-1.py311.1.nbc", "qdot.f-1.py311.2.nbc", "qdot.g-9.py311.nbi",
              "qdot.g-9.py311.1.nbc"):
        (sub / f).write_bytes(f.encode())
    good = {"numba": numba.__version__, "python": sys.implementation.cache_tag,
            "sources": kernels_cpu.sources_digest(), "targets": [TARGET.tag]}
    (root / "manifest.json").write_text(json.dumps({**good, **manifest}))


def test_prebuilt_kernels_seed_an_empty_cache_and_never_overwrite_one(tmp_path, monkeypatch):
    _fake_prebuilt(tmp_path / "_prebuilt")
    monkeypatch.setattr(kernels_cpu, "PREBUILT", tmp_path / "_prebuilt")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    dest = kernels_cpu.numba_cache_path(tmp_path / "kernels_cpu")
    dest.mkdir(parents=True)
    (dest / "qdot.g-9.py311.nbi").write_bytes(b"the user's own")
    assert kernels_cpu._seed_prebuilt() == 1
    assert sorted(p.name for p in dest.iterdir()) == ["qdot.f-1.py311.1.nbc", "qdot.f-1.py311.2.nbc",
                                                      "qdot.f-1.py311.nbi", "qdot.g-9.py311.nbi"]
    assert (dest / "qdot.f-1.py311.2.nbc").read_bytes() == b"qdot.f-1.py311.2.nbc"
    assert (dest / "qdot.g-9.py311.nbi").read_bytes() == b"the user's own"
    assert kernels_cpu._seed_prebuilt() == 0  # seeded already


@pytest.mark.parametrize("wrong", [{"numba": "0.1.0"}, {"python": "cpython-27"}, {"sources": "0" * 64},
                                   {"targets": ["x86-64-v3"] if TARGET.tag != "x86-64-v3" else ["x86-64-v4+avx512vnni"]}])
def test_prebuilt_kernels_for_another_numba_python_source_or_cpu_are_not_used(tmp_path, monkeypatch, wrong):
    _fake_prebuilt(tmp_path / "_prebuilt", **wrong)
    monkeypatch.setattr(kernels_cpu, "PREBUILT", tmp_path / "_prebuilt")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    assert kernels_cpu._seed_prebuilt() == 0
    assert not (tmp_path / "cache").exists()
