"""Load the default model, generate, stream, and chat: flashlm's Python API in brief.

    python examples/quickstart.py
"""

import flashlm

with flashlm.load(n_ctx=1024) as model:  # the default model, fetched into the cache on first use
    print(model.generate("The capital of France is", max_tokens=12, temperature=0))

    for chunk in model.stream("Once upon a time", max_tokens=40, seed=1):
        print(chunk.text, end="", flush=True)
    print(f"\n[{chunk.tokens_per_second:.0f} tok/s]")

    reply = model.chat([{"role": "user", "content": "Name three colours."}], max_tokens=40, temperature=0)
    print(reply)
