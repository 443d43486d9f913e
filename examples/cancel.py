"""Stop a long generation from another thread (a UI's stop button, a timeout).

    python examples/cancel.py
"""

import threading

import flashlm

with flashlm.load(n_ctx=1024) as model:
    threading.Timer(0.3, model.cancel).start()  # any thread may cancel, during prefill too
    story = [{"role": "user", "content": "Write a very long story about the sea."}]
    chunks = list(model.chat(story, stream=True, max_tokens=2000))
    print("".join(c.text for c in chunks))
    print(f"finish reason: {chunks[-1].finish_reason}, {chunks[-1].n_generated} tokens")
