"""The `flashlm` command line: run, chat, serve, pull, warmup, list, info, bench, convert, profile, probe-disk.

Errors a user can cause print one line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import __version__
from ..errors import FlashLMError, InvalidArgumentError

DESCRIPTION_RUN = """Stream the model's reply to stdout. The prompt is one user message in the
model's chat template, as `ollama run` does; with --raw, or for a model without a
template (a base model), the model completes the prompt as plain text."""
EPILOG_RUN = """examples:
  flashlm run -p "Why is the sky blue?"
  flashlm run --raw -p "The capital of France is" -n 16 --temp 0
  flashlm run -m gemma3-270m -p "Once upon a time" -n 64 --temp 0.7   # a base model: plain completion
  flashlm run -f question.txt --stop "###"
  echo "Write a haiku about the sea" | flashlm run -p -
  flashlm run -m ./model.gguf -p "Hello" --temp 0 --stats
"""


def _add_sampling(p: argparse.ArgumentParser):
    p.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling; 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling; 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repeat penalty; 1 = off (default 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64,
                   help="tokens the repeat penalty looks back over; 0 = none (default 64)")
    p.add_argument("--stop", action="append", metavar="STR", default=None,
                   help="end the reply where STR appears, STR not shown (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def _add_model(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None,
                   help="a .gguf path, an HF folder, or a registry name (default: smollm2-135m)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (default min(4096, model's))")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads (default: as many as run fastest, measured while decoding; physical cores at most)")
    p.add_argument("--memory-budget", default=None,
                   help="memory the model may use, beyond the process's own ~200 MiB; e.g. 800MiB or 2GiB")
    _add_cache_types(p)
    g = p.add_argument_group("streaming (models in the flash layout, see `flashlm convert`)")
    g.add_argument("--predictor", choices=["gate", "lowrank", "none"], default="gate",
                   help="which neurons a token loads: gate (exact, gate resident), lowrank (SVD estimate), "
                        "none (all) (default gate)")
    g.add_argument("--keep", type=float, default=None, help="fraction of FFN neurons a token keeps (default 0.8)")
    g.add_argument("--window", type=int, default=None,
                   help="tokens whose neurons stay in memory with --sliding; 0 keeps none (default 16)")
    g.add_argument("--sliding", action="store_true",
                   help="windows keep the neurons of the last --window tokens (the paper's) instead of each "
                        "layer's most often needed neurons for good")
    g.add_argument("--no-verify", action="store_true",
                   help="use a flash file's streamed records without checking their checksums (saves ~13-23%% of a token's "
                        "time on SmolLM2; a damaged file then gives wrong text instead of an error)")
    g = p.add_argument_group("speculative decoding (greedy output is the same with it)")
    g.add_argument("--draft", metavar="SRC", default=None,
                   help="draft tokens to verify in one pass: ngram (prompt lookup), model:PATH (a small model with "
                        "the same vocabulary) or self (a streamed model from what it holds in memory)")
    g.add_argument("--draft-max", type=int, default=8, help="most tokens drafted at once (default 8)")
    g.add_argument("--draft-min", type=int, default=1, help="fewest drafted tokens worth a pass (default 1)")
    g.add_argument("--draft-always", action="store_true",
                   help="speculate at every step (by default it pauses while it decodes slower than without)")
    g = p.add_argument_group("mixture-of-experts models under --memory-budget (experts stream into a cache)")
    g.add_argument("--policy", choices=["freq", "score", "lru", "lfu"], default="freq",
                   help="which cached expert makes room: the least often chosen lately (a moving average), the "
                        "lowest router-probability average, the least recent, or the least used since loaded "
                        "(default freq: the best hit rates on a real model's routing traces)")
    pf = g.add_mutually_exclusive_group()
    pf.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                   help="read the next layer's predicted experts while a layer computes: auto (the default) "
                        "measures while decoding whether that is faster here, and keeps whichever is; off "
                        "also stops a flash model's neuron prefetch")
    pf.add_argument("--no-prefetch", action="store_true", help="the same as --prefetch off")
    g.add_argument("--no-bundle", action="store_true",
                   help="read experts from the GGUF's stacked tensors (3 reads each) instead of writing their "
                        "bundle to the cache folder once (1 aligned read each; as large as the experts)")


def _add_cache_types(p: argparse.ArgumentParser):
    p.add_argument("-ctk", "--cache-type-k", default="f16", metavar="TYPE",
                   help="the KV cache's type for keys: f16, q8_0 (about half the memory) or q4_0 (about a quarter) "
                        "(default f16)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", metavar="TYPE",
                   help="the KV cache's type for values: f16, q8_0 or q4_0 (default f16)")


def _cache_types(args) -> dict:
    """--cache-type-k and --cache-type-v as load()'s arguments (checked)."""
    from ..kernels_cpu.attention import CACHE_TYPES

    out = {}
    for flag, key in (("--cache-type-k", "cache_type_k"), ("--cache-type-v", "cache_type_v")):
        value = getattr(args, key, "f16").lower()
        if value not in CACHE_TYPES:
            raise InvalidArgumentError(f"{flag} must be one of {', '.join(CACHE_TYPES)}, got {value!r}")
        out[key] = value
    return out


def _streaming(args) -> dict:
    """The StreamSettings fields the command line set."""
    out = {"predictor": None if args.predictor == "none" else args.predictor}
    if args.keep is not None:
        out["keep"] = args.keep
    if args.window is not None:
        out["window"] = args.window
    if getattr(args, "sliding", False):
        out["hot"] = False
    if _prefetch(args) is False:
        out["prefetch"] = False
    if getattr(args, "no_verify", False):
        out["verify"] = False
    return out


def _experts(args) -> dict:
    """The expert-cache options the command line set."""
    return {"policy": args.policy, "prefetch": _prefetch(args), "bundle": not args.no_bundle}


def _speculative(args) -> dict | None:
    """--draft and its settings as load()'s speculative (checked), or None."""
    from ..runtime.speculate import Speculation

    if getattr(args, "draft", None) is None:
        return None
    out = dict(source=args.draft, draft_max=args.draft_max, draft_min=args.draft_min, adaptive=not args.draft_always)
    Speculation.parse(out)
    return out


def _prefetch(args) -> bool | str:
    """--prefetch (and --no-prefetch) as the expert option: True, False or "auto"."""
    if getattr(args, "no_prefetch", False):
        return False
    return {"on": True, "off": False}.get(getattr(args, "prefetch", "auto"), "auto")


def _sampling(args) -> dict:
    """The Model.stream arguments the command line set (checked, as SamplingParams checks them)."""
    from ..runtime.sampler import SamplingParams

    out = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
               repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)
    SamplingParams(**out)
    if args.n_predict < 1:
        raise InvalidArgumentError(f"-n must be at least 1, got {args.n_predict}")
    stop = args.stop or []
    if "" in stop:  # it would end every reply before its first word
        raise InvalidArgumentError("--stop needs a non-empty string")
    return dict(out, max_tokens=args.n_predict, stop=stop)


def _prompt(args) -> str:
    """The prompt: -p TEXT, -p - (stdin) or -f FILE; what is read drops its final newlines."""
    where = "stdin" if args.file is None else f"-f {args.file}"
    try:
        if args.file is not None:
            with open(args.file, encoding="utf-8") as f:
                return f.read().rstrip("\r\n")
        return sys.stdin.read().rstrip("\r\n") if args.prompt == "-" else args.prompt
    except OSError as e:
        raise InvalidArgumentError(f"{where}: cannot read the prompt ({e.strerror or e})") from e
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{where}: the prompt is not UTF-8 text") from None


def cmd_chat(args) -> int:
    from ..formats.registry import resolve
    from .chat import run_chat

    from ..units import parse_size

    sampling = _sampling(args)  # bad settings fail here, before the UI
    kv = _cache_types(args)
    if args.memory_budget is not None:
        parse_size(args.memory_budget)
    resolve(args.model)  # and a missing file or unknown name (a registry model is pulled)
    return run_chat(args.model, n_ctx=args.ctx_size, n_threads=args.threads, memory_budget=args.memory_budget,
                    streaming=_streaming(args), experts=_experts(args), speculative=_speculative(args),
                    system=args.system, **kv, **sampling)


def cmd_run(args) -> int:
    import flashlm

    from ..io import device_read_bytes
    from .profile import warn_context

    prompt, sampling, kv = _prompt(args), _sampling(args), _cache_types(args)
    read0 = device_read_bytes()
    model = flashlm.load(args.model, n_ctx=args.ctx_size, n_threads=args.threads, memory_budget=args.memory_budget,
                         streaming=_streaming(args), experts=_experts(args), speculative=_speculative(args), **kv)
    with model:
        warn_context(model, args.model)
        if args.raw or not model.has_chat_template:
            chunks = model.stream(prompt, **sampling)
        else:  # as `ollama run`: the prompt is a user's message, the completion the model's reply
            chunks = model.chat([{"role": "user", "content": prompt}], stream=True, **sampling)
        last = None
        for c in chunks:
            sys.stdout.write(c.text)
            sys.stdout.flush()
            last = c
        sys.stdout.write("\n")
        if args.stats and last is not None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            read = device_read_bytes() - read0
            print(f"prompt: {last.n_prompt} tokens, {last.prompt_tokens_per_second:.1f} tok/s | "
                  f"generation: {last.n_generated} tokens, {last.tokens_per_second:.1f} tok/s | "
                  f"finish: {last.finish_reason} | peak RSS {peak / 2**20:.0f} MiB | "
                  f"read from disk {read / 1e6:.1f} MB | load {model.load_seconds:.2f} s | "
                  f"threads {model.threads}", file=sys.stderr)
            _print_stream_stats(model.take_stats(), model.expert_prefetch)
            if last.speculation is not None:
                print(last.speculation.describe(), file=sys.stderr)
    return 0


def _print_stream_stats(passes, prefetch: str | None) -> None:
    """What a streamed model read from disk and how often its windows or expert cache hit
    (nothing for a resident model)."""
    from ..stats import TokenStats

    every, decode = TokenStats.total(passes), TokenStats.total(p for p in passes if not p.prefill)
    if decode.window_hit_rate is not None:
        print(f"streamed: {every.bytes_read / 1e6:.1f} MB read from disk in {every.reads} reads | "
              f"decode {decode.bytes_read / max(1, decode.tokens) / 1e6:.2f} MB/token, "
              f"window hit rate {decode.window_hit_rate:.0%}", file=sys.stderr)
    if every.expert_hit_rate is not None:
        pf = (f", prefetch precision {every.prefetch_precision:.0%} recall {every.prefetch_recall:.0%}"
              if every.prefetch_precision is not None else "")
        print(f"experts: cache hit rate {every.expert_hit_rate:.0%}, {every.bytes_read / 1e6:.1f} MB read, "
              f"{every.io_wait_s * 1e3:.0f} ms waited for reads{pf}, prefetch {prefetch}", file=sys.stderr)


def cmd_serve(args) -> int:
    import flashlm
    import psutil

    from ..formats.registry import display_name, resolve
    from ..runtime.sampler import SamplingParams
    from ..units import parse_size
    from .profile import idle_rss, warn_context
    from .server import bind, serve  # (FastAPI and uvicorn in before the base RSS is measured)

    if args.parallel < 1:
        raise InvalidArgumentError(f"--parallel must be at least 1, got {args.parallel}")
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {args.port}")
    if args.n_predict is not None and args.n_predict < 1:
        raise InvalidArgumentError(f"-n must be at least 1, got {args.n_predict}")
    if args.api_key is not None and not args.api_key.strip():
        raise InvalidArgumentError("--api-key needs a non-empty key")
    cache_ram = 0 if args.cache_ram.strip() in ("0", "off") else parse_size(args.cache_ram)
    kv = _cache_types(args)
    if args.memory_budget is not None:
        parse_size(args.memory_budget)
    defaults = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repeat_penalty=args.repeat_penalty)
    SamplingParams(**defaults)
    if args.slot_save_path is not None:
        try:
            os.makedirs(args.slot_save_path, exist_ok=True)
        except OSError as e:
            raise InvalidArgumentError(f"--slot-save-path {args.slot_save_path}: cannot make the folder "
                                       f"({e.strerror or e})") from None
    resolve(args.model)  # a missing file or unknown name fails here (a registry model is pulled), port still free
    sock = bind(args.host, args.port)
    try:
        base = idle_rss(psutil.Process())
        model = flashlm.load(args.model, n_ctx=args.ctx_size, n_threads=args.threads,
                             memory_budget=args.memory_budget, streaming=_streaming(args), experts=_experts(args),
                             parallel=args.parallel, cache_ram=cache_ram,  # the plan counts both
                             speculative=_speculative(args), **kv)
        with model:
            warn_context(model, args.model)
            serve(model, sock=sock, api_key=args.api_key, slot_save_path=args.slot_save_path,
                  model_id=args.alias or display_name(args.model), defaults=defaults, max_tokens=args.n_predict,
                  base_rss=base)
    finally:
        sock.close()
    return 0


def cmd_pull(args) -> int:
    from ..formats import registry

    names = args.names or [registry.DEFAULT_MODEL]
    for name in names:
        already = name in registry.MODELS and registry.is_pulled(name)
        path = registry.pull(name)
        print(f"{name}: {'already in the cache' if already else 'pulled to'} {path}")
    return 0


def cmd_warmup(args) -> int:
    """Compile the kernels ahead (numba's cache keeps them): the ones a model runs, with
    -m (loading it warms them), else every kernel any model may run."""
    import numba

    from ..runtime import warmup

    t0 = time.perf_counter()
    if args.model:
        import flashlm

        with flashlm.load(args.model, n_threads=args.threads):
            pass
        what = f"the kernels {args.model} runs"
    else:
        warmup.warm(list(warmup.STEPS))
        what = "every kernel"
    where = numba.config.CACHE_DIR or "numba's default (__pycache__ beside the package)"
    print(f"{what}: ready in {time.perf_counter() - t0:.1f} s (compiled code kept in {where})")
    return 0


def cmd_list(args) -> int:
    from ..formats import registry

    for name, entry in registry.MODELS.items():
        mark = "pulled" if registry.is_pulled(name) else "not pulled"
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        print(f"{name}{default}: {entry.about} [{mark}]")
    return 0


def cmd_info(args) -> int:
    import flashlm
    from collections import Counter

    from ..formats.registry import display_name
    from ..units import format_size
    from .profile import warn_context

    if args.model_arg and args.model and args.model_arg != args.model:
        raise InvalidArgumentError(f"two models given ({args.model_arg} and -m {args.model}); give one")
    args.model = args.model or args.model_arg
    t0 = time.perf_counter()
    with flashlm.load(args.model, n_ctx=args.ctx_size, n_threads=args.threads, memory_budget=args.memory_budget,
                      streaming=_streaming(args), experts=_experts(args), **_cache_types(args)) as m:
        warn_context(m, args.model)
        cfg = m.config
        types = Counter(t.qtype.name for t in m.file.tensors.values())
        print(f"model:        {display_name(args.model)} ({m.path})")
        print(f"architecture: {cfg.arch}, {cfg.n_layer} layers, d={cfg.n_embd}, ff={cfg.n_ff}, "
              f"heads={cfg.n_head}/{cfg.n_head_kv} kv, head_dim={cfg.head_dim}, vocab={cfg.n_vocab}")
        print(f"weights:      {format_size(m.store.resident_bytes)} "
              f"({', '.join(f'{k} x{v}' for k, v in types.most_common())})")
        print(f"context:      {m.n_ctx} (trained {cfg.n_ctx_train}); KV cache "
              f"{format_size(m.n_ctx * m.kv_bytes_per_position)} at {m.cache_type}")
        print(f"layout:       {m.layout}")
        if m.plan is not None:
            print(m.plan.table())
        print(f"loaded in:    {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_bench(args) -> int:
    from .bench import format_kernel_table, format_table, run_bench, run_kernel_bench

    _cache_types(args)
    if args.kernels:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be at least 1, got {args.threads}")
        rows = run_kernel_bench(threads=args.threads, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
        print(format_kernel_table(rows, args.threads))
        return 0
    models = args.model or [None]
    engines = ("flashlm", "llama.cpp")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # an optional extra
        engines = ("flashlm",)
        print("note: llama.cpp is not installed, so there is no baseline column; for it:"
              " pip install 'flashlm[llamacpp]'", file=sys.stderr)
    rows = []
    for model in models:
        rows += run_bench(model, threads=args.threads, pp=args.n_prompt, tg=args.n_gen, reps=args.reps,
                          engines=engines, draft=args.draft,
                          progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True),
                          **_cache_types(args))
    print(format_table(rows))
    return 0


def cmd_convert(args) -> int:
    from ..runtime.convert import convert
    from ..formats.registry import resolve

    src = resolve(args.model)
    if not args.flash:
        raise InvalidArgumentError("say which layout to write: --flash OUT (the only one so far)")
    if os.path.isdir(src):
        raise InvalidArgumentError(f"{src} is a folder; convert takes a .gguf model")
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads must be at least 1, got {args.threads}")
    out = convert(src, args.flash, force=args.force, n_threads=args.threads)  # a bar on stderr (flashlm.progress)
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB, flash layout)")
    return 0


def cmd_profile(args) -> int:
    from .profile import ensure_dir, parse_fractions, profile_run, summary_table, sweep

    if args.n_predict < 1:
        raise InvalidArgumentError("-n must be at least 1")
    _cache_types(args)
    out = ensure_dir(args.output)
    if args.sweep:
        runs = sweep(args.model, out, parse_fractions(args.sweep), args.prompt, args.n_predict, args.ctx_size,
                     args.threads, _streaming(args), experts=_experts(args), speculative=_speculative(args),
                     **_cache_types(args))
        moe = any(r.get("expert_hit_rate") is not None for r in runs)
        print(f"| budget % | budget MiB | tok/s | MB read/token | {'expert cache hits' if moe else 'window hits'} |")
        print("|---:|---:|---:|---:|---:|")
        for r in runs:
            if "error" in r:
                print(f"| {r['fraction']:.0%} | {r['budget'] / 2**20:.0f} | below the minimum | | |")
            else:
                rate = r["expert_hit_rate"] if moe else r["window_hit_rate"]
                hits = "-" if rate is None else f"{rate:.0%}"
                print(f"| {r['fraction']:.0%} | {r['budget'] / 2**20:.0f} | {r['tokens_per_second']:.1f} | "
                      f"{r['mb_read_per_token']:.2f} | {hits} |")
        print(f"wrote {out}/sweep.json and {out}/sweep.png")
        return 0
    prof = profile_run(args.model, out, args.prompt, args.n_predict, args.memory_budget, args.ctx_size, args.threads,
                       _streaming(args), experts=_experts(args), speculative=_speculative(args),
                       **_cache_types(args))
    print(summary_table(prof))
    print(f"wrote {out}/profile.json and {out}/profile.png")
    return 0


def cmd_probe_disk(args) -> int:
    from ..io.probe import format_probe, probe_disk, save_probe

    if args.size_mib < 16 or args.seconds <= 0:
        raise InvalidArgumentError("--size-mib must be at least 16 and --seconds positive")
    if args.dir and not os.path.isdir(args.dir):
        raise InvalidArgumentError(f"--dir {args.dir}: no such folder")
    rows = probe_disk(args.dir, file_mib=args.size_mib, seconds=args.seconds,
                      progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    print(format_probe(rows))
    print(f"saved to {save_probe(rows)} (streamed models read it at load)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as flashlm's: one line, exit 2."""

    def error(self, message):
        print(f"flashlm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flashlm", description="Run quantized LLMs on a laptop CPU.")
    ap.add_argument("--version", action="version", version=f"flashlm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="stream a reply to stdout", description=DESCRIPTION_RUN, epilog=EPILOG_RUN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    src = p.add_mutually_exclusive_group()  # one of them is required: main() checks it, in argparse's words
    src.add_argument("-p", "--prompt", help="the prompt; - reads it from stdin")
    src.add_argument("-f", "--file", help="read the prompt from FILE")
    p.add_argument("--raw", action="store_true",
                   help="complete the prompt as plain text, without the model's chat template")
    _add_sampling(p)
    p.add_argument("--stats", action="store_true", help="print speed and memory figures to stderr")
    p.set_defaults(func=cmd_run, usage_error=p.error)
    p = sub.add_parser("chat", help="chat in the terminal (streaming, /help for commands)",
                       epilog="examples:\n  flashlm chat\n  flashlm chat -m gemma3-270m --temp 0.7\n"
                              "  flashlm chat --system \"You answer in one sentence.\"\n\n"
                              "keys: Enter sends, Shift+Enter or a \"\"\"-block for new lines, Esc or Ctrl+C stops a "
                              "reply,\nCtrl+C twice at an empty prompt quits; /help lists the commands",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    _add_sampling(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, tools, JSON schema)",
                       description="Serve the model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions,\n"
                                   "/v1/models), with llama-server's /tokenize, /detokenize, /health, /metrics and\n"
                                   "/slots. Up to --parallel requests decode together; more queue.",
                       epilog="examples:\n  flashlm serve\n  flashlm serve -m gemma3-270m --port 8081 --parallel 2\n"
                              "  flashlm serve --api-key secret --cache-ram 512MiB --slot-save-path slots\n\n"
                              "then: curl http://127.0.0.1:8080/v1/models, or any OpenAI client with\n"
                              "base_url=\"http://127.0.0.1:8080/v1\"; Ctrl+C or SIGTERM stops it",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks a free one)")
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request but /health")
    g.add_argument("--parallel", type=int, default=4,
                   help="sequences decoded together (default 4); more requests queue")
    g.add_argument("--cache-ram", default="256MiB",
                   help="prompt cache: KV caches of recent sequences kept for prompts that start the same way, "
                        "least recently used out (default 256MiB; 0 = off)")
    g.add_argument("--slot-save-path", metavar="DIR", default=None,
                   help="folder for POST /slots/ID?action=save|restore (off without it)")
    g.add_argument("--alias", default=None, help="the model's id in the API (default: its registry or file name)")
    g = p.add_argument_group("defaults for requests that do not set them")
    g.add_argument("-n", "--n-predict", type=int, default=None,
                   help="max_tokens (default: until the model stops or the context is full, as OpenAI)")
    g.add_argument("--temp", type=float, default=1.0, help="temperature (default 1.0, OpenAI's)")
    g.add_argument("--top-p", type=float, default=1.0, help="top_p (default 1.0, OpenAI's)")
    g.add_argument("--top-k", type=int, default=40, help="top_k; 0 = off (default 40, llama-server's)")
    g.add_argument("--min-p", type=float, default=0.05, help="min_p; 0 = off (default 0.05, llama-server's)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="repeat_penalty; 1 = off (default 1.0)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("pull", help="fetch registry models into the cache",
                       epilog="examples:\n  flashlm pull\n  flashlm pull gemma3-270m",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="registry names (default: the default model)")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("warmup", help="compile the kernels ahead (first run only; numba's cache keeps them)",
                       epilog="examples:\n  flashlm warmup\n  flashlm warmup -m gemma3-270m",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None,
                   help="compile only what this model runs (it loads); default: every kernel")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: the physical cores)")
    p.set_defaults(func=cmd_warmup)
    p = sub.add_parser("list", help="list registry models")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="describe a model", epilog="examples:\n  flashlm info gemma3-270m\n"
                              "  flashlm info smollm2.flash.gguf --memory-budget 150MiB -c 512",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_arg", nargs="?", metavar="MODEL", default=None, help="the model (or give it with -m)")
    _add_model(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="tok/s of flashlm beside llama.cpp on the same GGUF",
                       epilog="examples:\n  flashlm bench\n  flashlm bench -m smollm2-135m -m gemma3-270m -t 2 -r 5\n"
                              "  flashlm bench --kernels -t 2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", action="append", help="a GGUF path or registry name (repeatable; default model)")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prefill test length (default 128; 0 = skip)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="decode test length (default 128; 0 = skip)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions; the table shows medians (default 3)")
    p.add_argument("--draft", choices=["ngram"], default=None,
                   help="also a copy task, greedy, with and without prompt-lookup drafts (flashlm's ngram beside "
                        "llama.cpp's prompt lookup)")
    p.add_argument("--kernels", action="store_true",
                   help="instead: the kernel micro-benchmark (GB/s of weights per type and shape)")
    _add_cache_types(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("convert", help="write a model in the flash layout (FFN neurons bundled for streaming)",
                       epilog="examples:\n  flashlm convert -m smollm2-135m --flash smollm2.flash.gguf\n"
                              "  flashlm run -m smollm2.flash.gguf -p \"Hello\"   # FFN weights streamed from disk",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="a .gguf path or registry name (default: smollm2-135m)")
    p.add_argument("--flash", metavar="OUT", default=None, help="write the flash layout to OUT")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads for the calibration run (default: chosen while decoding)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("profile", help="per-token latency, disk reads and memory under a budget (JSON + plot)",
                       epilog="examples:\n  flashlm profile -o prof\n"
                              "  flashlm profile -m smollm2.flash.gguf --memory-budget 140MiB -c 256 -n 32 -o prof\n"
                              "  flashlm profile -m smollm2.flash.gguf -c 256 --sweep 80%,90%,100% -o sweep",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    p.add_argument("-p", "--prompt", default="The history of the city begins", help="the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("-o", "--output", required=True, help="folder for profile.json and profile.png")
    p.add_argument("--sweep", default=None,
                   help="budgets as percentages of what holds every streamed neuron (or every expert of a "
                        "mixture of experts), e.g. 80%%,90%%,100%%")
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("probe-disk", help="measure this disk's read curve (direct I/O) for flashload",
                       epilog="examples:\n  flashlm probe-disk\n  flashlm probe-disk --dir /mnt/ssd --seconds 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="folder on the disk to measure (default: the model cache)")
    p.add_argument("--size-mib", type=int, default=256, help="scratch file size, deleted after (default 256)")
    p.add_argument("--seconds", type=float, default=0.5, help="time per read size and depth (default 0.5)")
    p.set_defaults(func=cmd_probe_disk)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_run and args.prompt is None and args.file is None:
        args.usage_error("the following arguments are required: -p/--prompt (or -f/--file)")
    try:
        return args.func(args)
    except FlashLMError as e:
        print(f"flashlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nflashlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
