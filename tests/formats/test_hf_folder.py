"""An HF folder made from the default model loads through the same API and is the same model."""

import numpy as np
import pytest

import flashlm
from flashlm import kernels_cpu
from conftest import cosine_rows
from hf_fixture import gguf_to_hf
from parity_prompts import PROMPTS


@pytest.fixture(scope="module")
def hf_folder(smollm2_path, tmp_path_factory):
    return gguf_to_hf(smollm2_path, tmp_path_factory.mktemp("hf") / "smollm2-hf")


def test_hf_folder_matches_gguf(smollm2_path, hf_folder):
    with flashlm.load(smollm2_path, n_ctx=512) as g, flashlm.load(hf_folder, n_ctx=512) as h:
        assert h.file.kind == "hf" and h.config.rope_type == "neox" and g.config.rope_type == "norm"
        exact, default = [], []
        for prompt in PROMPTS:
            tokens = g.tokenize(prompt)
            assert h.tokenize(prompt) == tokens  # tokenizer.json agrees with llama.cpp here
            with kernels_cpu.float_activations():
                exact.append(cosine_rows(g.logits(tokens), h.logits(tokens)))
            default.append(cosine_rows(g.logits(tokens), h.logits(tokens)))
        exact, default = np.concatenate(exact), np.concatenate(default)
        print(f"\nHF vs GGUF, float activations: cos min {exact.min():.5f}; with GGUF's default 8-bit "
              f"activations: min {default.min():.4f}, median {np.median(default):.5f}")
        assert exact.min() >= 0.99
        assert np.median(default) >= 0.999


def test_hf_folder_chats(hf_folder):
    with flashlm.load(hf_folder, n_ctx=256) as h:
        reply = h.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0)
        assert "4" in reply
