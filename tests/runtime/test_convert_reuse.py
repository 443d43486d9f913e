"""`convert` with the default options copies a current conversion from the cache folder
instead of converting again (the conversion is deterministic)."""

import filecmp

from flashlm.runtime import convert as C


def test_convert_copies_the_cached_conversion(tmp_path, smollm2_path, monkeypatch):
    made = C.cached(smollm2_path)
    calls = []
    real_write = C._write
    monkeypatch.setattr(C, "_write", lambda *a, **kw: calls.append(a) or real_write(*a, **kw))
    out = C.convert(smollm2_path, tmp_path / "copy.flash.gguf")
    assert calls == [] and filecmp.cmp(made, out, shallow=False)
    assert not list(tmp_path.glob("*.partial*"))


def test_other_options_convert_afresh(tmp_path, smollm2_path, monkeypatch):
    C.cached(smollm2_path)
    calls = []
    monkeypatch.setattr(C, "_write", lambda src, out, *a, **kw: calls.append(out) or out)
    C.convert(smollm2_path, tmp_path / "a.flash.gguf", rank=8)
    C.convert(smollm2_path, tmp_path / "b.flash.gguf", calibration_tokens=0)
    assert calls == [tmp_path / "a.flash.gguf", tmp_path / "b.flash.gguf"]
