"""Describe one or more images.

    python examples/describe_image.py --model google/gemma-3n-E2B-it photo.jpg [more.jpg ...]
"""

import argparse

import mlx_gemma3n
from mlx_gemma3n import user_message

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("images", nargs="+")
p.add_argument("--prompt", default="Describe this image in detail.")
args = p.parse_args()

model, processor = mlx_gemma3n.load(args.model)
prompt = [user_message(args.prompt, images=args.images)]
mlx_gemma3n.generate(model, processor, prompt, max_tokens=400, verbose=True)
