"""Hostile model files (issue 29): mutated tiny models, each loaded with
flashlm.load(path, n_ctx=64, n_threads=1) and asked for 2 tokens in a forked child
(fuzz_runner.py) under RLIMIT_AS. The contract: a FlashLMError, or a model that loads and
generates; never another exception, a signal, a hang or an address space grown by
more than 2 GiB.

The CI tests run a few hundred hypothesis cases over the GGUF header, metadata and tensor
infos (a BPE llama, a SentencePiece gemma3, a flash layout) and over an HF folder's
safetensors header and config.json; the slow one runs 10,000. Each crash found is kept
under regressions/ (regressions/README.md) and loaded by test_regressions.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_runner import ForkServer
from mutations import GGUF_OPS, HF_OPS, gguf_layout, mutate_gguf, mutate_hf
from tiny_models import fuzz_seeds

REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.tar.gz"))
CI_CASES = {"bpe": 150, "spm": 60, "flash": 60, "hf": 100}
SLOW_CASES = {"bpe": 4000, "spm": 2000, "flash": 2000, "hf": 2000}


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(seeds, GGUF layouts, a ForkServer warmed up on the seeds)."""
    folder = tmp_path_factory.mktemp("fuzz")
    seeds = fuzz_seeds(folder / "seeds")
    warm = [folder / "seeds" / f for f in ("tiny-bpe.gguf", "tiny-spm.gguf", "tiny-bpe.flash.gguf", "tiny-hf")]
    server = ForkServer(warm, folder / "work")
    layouts = {k: gguf_layout(files["model.gguf"]) for k, (files, _) in seeds.items() if k != "hf"}
    yield seeds, layouts, server
    server.close()


def _ops(kinds):
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
                    min_size=1, max_size=3)


def _run(fuzz, seed: str, ops):
    seeds, layouts, server = fuzz
    files, target = seeds[seed]
    if seed == "hf":
        files = mutate_hf(files, ops)
    else:
        files = {"model.gguf": mutate_gguf(files["model.gguf"], layouts[seed], ops)}
    return server.run(files, target)


def _check(fuzz, seed: str, n: int) -> None:
    @settings(max_examples=n, deadline=None, database=None)
    @given(_ops(HF_OPS if seed == "hf" else GGUF_OPS))
    def case(ops):
        r = _run(fuzz, seed, ops)
        assert r.allowed, f"{seed} with ops {ops}: {r.outcome}: {r.detail}"

    case()


def test_the_seeds_load_and_generate(fuzz):
    seeds, _, server = fuzz
    for name, (files, target) in seeds.items():
        r = server.run(files, target)
        assert r.outcome == "ok", f"{name}: {r}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("seed", list(CI_CASES))
def test_mutated_model_files_fail_cleanly_or_load(fuzz, seed):
    _check(fuzz, seed, CI_CASES[seed])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", list(SLOW_CASES))
def test_ten_thousand_mutated_model_files_fail_cleanly_or_load(fuzz, seed):
    _check(fuzz, seed, SLOW_CASES[seed])


def unpack(path: Path) -> tuple[dict, str, dict]:
    """A regression case: ({file name: bytes}, the file to load, its case.json)."""
    with tarfile.open(path) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    meta = json.loads(files.pop("case.json"))
    return files, "model.gguf" if "model.gguf" in files else ".", meta


@pytest.mark.parametrize("case", REGRESSIONS, ids=[p.name.split(".")[0] for p in REGRESSIONS])
def test_regressions(fuzz, case):
    # each crashed flashlm once (case.json's "before"); now each ends as "expect" says:
    # a FlashLMError, or (a metadata string that is not UTF-8, say) a model that generates
    files, target, meta = unpack(case)
    r = fuzz[2].run(files, target)
    assert r.outcome == meta["expect"], f"{case.name} (before: {meta['before']['detail']}): {r.outcome}: {r.detail}"


def test_regressions_are_kept_small():
    assert len(REGRESSIONS) >= 40
    assert sum(p.stat().st_size for p in REGRESSIONS) < 400_000  # gzipped: headers and zeroed weights
