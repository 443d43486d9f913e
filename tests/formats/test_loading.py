"""Loading: zero-copy GGUF views, configs from metadata, and clear errors for bad input."""

import gguf
import numpy as np
import pytest

import flashlm
from flashlm.errors import FlashLMError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from flashlm.formats.modelfile import GGUFModelFile


def test_gguf_tensors_are_views_into_the_mapped_file(smollm2_path):
    mf = GGUFModelFile(smollm2_path)
    t = mf.tensors["blk.0.ffn_up.weight"]
    base = t.data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not t.data.flags.owndata


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_rss_after_load_is_far_below_file_size(model, request):
    path = request.getfixturevalue(model)
    with flashlm.load(path, n_ctx=256) as m:
        resident = m.store.file_resident_bytes()
        size = path.stat().st_size
        print(f"{path.name}: {resident / 2**20:.1f} MiB of {size / 2**20:.1f} MiB resident after load")
        assert resident < 0.1 * size


def test_configs_from_metadata(smollm2_path, gemma3_path):
    with flashlm.load(smollm2_path, n_ctx=64) as m:
        c = m.config
        assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.n_ff) == ("llama", 30, 576, 9, 3, 1536)
        assert c.rope_type == "norm" and c.tied_output and c.sliding_window == 0
    with flashlm.load(gemma3_path, n_ctx=64) as m:
        c = m.config
        assert (c.arch, c.n_layer, c.n_embd, c.head_dim, c.sliding_window) == ("gemma3", 18, 640, 256, 512)
        assert c.rope_type == "neox" and c.embed_scale == pytest.approx(640 ** 0.5)
        assert c.swa_layers[:6] == (True,) * 5 + (False,)


def test_missing_file():
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        flashlm.load("/tmp/definitely/nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        flashlm.load(p)


@pytest.mark.parametrize("keep", [0.02, 0.5])
def test_truncated_gguf(tmp_path, smollm2_path, keep):
    data = smollm2_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFormatError, match="truncated") as e:
        flashlm.load(p)
    assert str(p) in str(e.value)


def _tiny_gguf(path, arch, qtype=gguf.GGMLQuantizationType.F32):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(1)
    w.add_feed_forward_length(32)
    w.add_context_length(64)
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    else:
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((16, 256 // bs * ts), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    p = _tiny_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(UnsupportedModelError, match="architecture 'rwkv6'") as e:
        flashlm.load(p)
    assert str(p) in str(e.value)


def test_unsupported_quant_type(tmp_path):
    p = _tiny_gguf(tmp_path / "q2k.gguf", "llama", gguf.GGMLQuantizationType.Q2_K)
    with pytest.raises(UnsupportedModelError, match="Q2_K") as e:
        flashlm.load(p)
    assert str(p) in str(e.value)


def test_unknown_registry_name():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        flashlm.load("no-such-model")


def test_budget_below_resident_minimum_names_it(smollm2_path):
    with pytest.raises(FlashLMError, match=r"below the minimum [0-9.]+ MiB .*flash layout") as e:
        flashlm.load(smollm2_path, memory_budget="10MB")
    # the minimum holds every weight and the KV cache
    minimum = float(str(e.value).split("minimum ")[1].split(" MiB")[0]) * 2**20
    with flashlm.load(smollm2_path, n_ctx=64, memory_budget=int(minimum)) as m:
        assert m.plan.minimum <= m.plan.budget and m.plan.resident + m.plan.kv <= m.plan.minimum
