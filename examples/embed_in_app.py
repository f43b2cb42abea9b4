"""The minimal shape of Gemma 3n inside an app: load once, stream replies, cancel, and keep
conversations on disk so they resume without re-reading the prompt.

    python examples/embed_in_app.py --model google/gemma-3n-E2B-it
"""

import argparse
import threading
from pathlib import Path

import mlx_gemma3n
from mlx_gemma3n import ChatSession, PromptCache, SamplingOptions

p = argparse.ArgumentParser()
p.add_argument("--model", default="demo")
args = p.parse_args()
model, processor = mlx_gemma3n.load(args.model)  # towers load when first used
store = Path("conversation.safetensors")
cache = PromptCache.load(store) if store.exists() else None
chat = ChatSession(model, processor, prompt_cache=cache)

stop = threading.Event()  # a UI's "Stop" button would set this
sampling = SamplingOptions(temperature=0.7, top_p=0.95, seed=0)
for r in chat.send("Write a haiku about the sea.", sampling=sampling, max_tokens=64, should_stop=stop.is_set):
    print(r.text, end="", flush=True)
print(f"\n[{r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s, {r.finish_reason}]")
chat.prompt_cache.save(store)
