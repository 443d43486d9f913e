"""The flash layout (flashload/layout.py) and streaming its FFN neurons (store.py):
with every neuron streamed, the model is the resident model, bit for bit."""

import numpy as np
import pytest

import flashlm
from flashlm.apps.cli import main
from flashlm.errors import ModelFormatError
from flashlm.flashload import layout
from flashlm.flashload.store import FlashStore
from flashlm.runtime.modelfile import GGUFModelFile


@pytest.fixture(scope="module")
def flash_files(tmp_path_factory, smollm2_path, gemma3_path):
    d = tmp_path_factory.mktemp("flash")
    return {name: layout.convert(path, d / f"{name}.flash.gguf")
            for name, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path))}


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_bundles_hold_each_neurons_gate_up_rows_and_down_column(name, flash_files, request):
    src = GGUFModelFile(request.getfixturevalue(f"{name}_path"))
    mf = GGUFModelFile(flash_files[name])
    plans = layout.read_plans(mf)
    assert len(plans) == int(src.metadata[f"{src.arch}.block_count"])
    for lb in (plans[0], plans[-1]):
        gate, up, down = (src.tensors[f"blk.{lb.layer}.{n}.weight"] for n in layout.FFN)
        assert lb.types == (gate.qtype, up.qtype, down.qtype)
        t = mf.tensors[f"blk.{lb.layer}.ffn_bundles"]
        assert t.offset % layout.ALIGN == 0 and lb.stride % layout.ALIGN == 0  # one aligned read per bundle
        a, b, c = lb.parts
        for g in (0, lb.n_groups - 1):
            bundle = t.data[g]
            rows = slice(g * lb.group, (g + 1) * lb.group)
            np.testing.assert_array_equal(bundle[:a], gate.data[rows].reshape(-1))
            np.testing.assert_array_equal(bundle[a:a + b], up.data[rows].reshape(-1))
            cols = slice(g * lb.down_bytes, (g + 1) * lb.down_bytes)
            np.testing.assert_array_equal(bundle[a + b:a + b + c], down.data[:, cols].reshape(-1))
            assert not bundle[a + b + c:].any()
        np.testing.assert_array_equal(mf.tensors[f"blk.{lb.layer}.ffn_perm"].data.view(np.int32).reshape(-1),
                                      np.arange(lb.n_ff))
    for t in src.tensors.values():  # everything else as it was
        if not any(f".{n}." in t.name for n in layout.FFN):
            np.testing.assert_array_equal(mf.tensors[t.name].data, t.data)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_model_equals_resident(name, flash_files, request):
    resident = flashlm.Model(request.getfixturevalue(f"{name}_path"), n_threads=2)
    streamed = flashlm.Model(flash_files[name], n_threads=2)
    assert isinstance(streamed.store, FlashStore)
    assert streamed.store.resident_bytes < resident.store.resident_bytes
    tokens = resident.tokenize("The quick brown fox jumps over the lazy dog, and then")
    np.testing.assert_array_equal(streamed.logits(tokens), resident.logits(tokens))
    st = streamed.store.reset_stats()
    assert st.groups == sum(lb.n_groups for lb in streamed.store.plans)  # every neuron, once (one prefill chunk)
    assert st.bytes_read >= st.groups * min(lb.stride for lb in streamed.store.plans) * 0.9
    resident.model.fused = None  # the same layer-by-layer decode path as the streamed model
    kw = dict(max_tokens=8, temperature=0.0)
    assert streamed.generate("Once upon a time", **kw) == resident.generate("Once upon a time", **kw)
    streamed.close()
    resident.close()


def test_convert_refuses_to_overwrite_and_rejects_non_flash_files(flash_files, smollm2_path, tmp_path, capsys):
    out = flash_files["smollm2"]
    assert main(["convert", "-m", str(smollm2_path), "--flash", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "-m", str(out), "--flash", str(tmp_path / "again.gguf")]) == 2
    assert "already in the flash layout" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ModelFormatError, match="not a flash-layout file"):
        layout.read_plans(GGUFModelFile(smollm2_path))
    assert main(["convert", "-m", str(smollm2_path), "--flash", str(tmp_path / "s.gguf"), "--force"]) == 0
    assert "flash layout" in capsys.readouterr().out
