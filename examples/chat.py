"""Multi-turn chat that keeps the KV cache between turns and can resume from disk.

    python examples/chat.py --model google/gemma-3n-E2B-it [--resume chat.safetensors]
"""

import argparse
from pathlib import Path

import mlx_gemma3n
from mlx_gemma3n import ChatSession, PromptCache

p = argparse.ArgumentParser()
p.add_argument("--model", default="demo")
p.add_argument("--resume", help="prompt-cache file to continue from and save to")
args = p.parse_args()

model, processor = mlx_gemma3n.load(args.model)
cache = PromptCache.load(args.resume) if args.resume and Path(args.resume).exists() else None
chat = ChatSession(model, processor, system="You are a helpful assistant.", prompt_cache=cache)

try:
    for text in iter(lambda: input(">> ").strip(), ""):
        for r in chat.send(text, max_tokens=512):
            print(r.text, end="", flush=True)
        print()
except EOFError:
    pass
if args.resume:
    chat.prompt_cache.save(args.resume)
