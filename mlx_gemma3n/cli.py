"""The command line behind `python -m mlx_gemma3n.generate` (and the `mlx-gemma3n` script)."""

import argparse
import sys
from typing import Iterable

from .api import ChatSession, GenerationResponse, SamplingOptions, load
from .audio.io import AudioError
from .loading import CheckpointError
from .vision.processor import ImageError

USER_ERRORS = (CheckpointError, ImageError, AudioError, FileNotFoundError, ValueError)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlx_gemma3n.generate",
        description="Generate text with Gemma 3n from text, images and audio.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, Hub id, or 'demo'")
    p.add_argument("--prompt", help="the user message (required unless --chat)")
    p.add_argument("--image", nargs="+", default=[], help="image file(s)")
    p.add_argument("--audio", nargs="+", default=[], help="audio file(s): wav, flac, ogg")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    p.add_argument("--text-only", action="store_true", help="never load the audio/vision towers")
    args = p.parse_args(argv)
    if not args.chat and args.prompt is None:
        p.error("--prompt is required unless --chat is given")
    return args


def _stream(responses: Iterable[GenerationResponse]) -> GenerationResponse:
    last = None
    for last in responses:
        print(last.text, end="", flush=True)
    print()
    return last


def _stats(r: GenerationResponse) -> None:
    print(
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens/s | "
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens/s | "
        f"Peak memory: {r.peak_memory_gb:.3f} GB",
        file=sys.stderr,
    )


def _chat(session: ChatSession, options: dict) -> None:
    print("Chat with Gemma 3n. Empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input(">> ").strip()
        except EOFError:
            break
        if not text:
            break
        _stats(_stream(session.send(text, **options)))


def run(args: argparse.Namespace) -> None:
    if args.model == "demo":
        print("[demo] random-weight tiny Gemma 3n: the output is meaningless text", file=sys.stderr)
    sampling = SamplingOptions(
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    sampling.validate()
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    model, processor = load(args.model, text_only=args.text_only)
    session = ChatSession(model, processor, system=args.system)
    options = {"max_tokens": args.max_tokens, "sampling": sampling}
    if args.prompt is not None:
        _stats(_stream(session.send(args.prompt, images=args.image, audio=args.audio, **options)))
    if args.chat:
        _chat(session, options)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)

