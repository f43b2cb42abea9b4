"""Run by test_threads.py in a fresh process: one way an app may use the API from threads.
Prints the tokens of each request as JSON; the process must then exit with status 0.

    python thread_patterns.py PATTERN CHECKPOINT"""

import json
import sys
import threading
from pathlib import Path

import mlx_gemma3n
from mlx_gemma3n import SamplingOptions, user_message

ASSETS = Path(__file__).parents[1] / "examples" / "assets"
REQUESTS = {
    "text": ("Describe a cat.", [], [], SamplingOptions()),
    "sampled": ("Tell a story.", [], [], SamplingOptions(temperature=1.0, seed=7)),
    "image": ("What is this?", [str(ASSETS / "cat.png")], [], SamplingOptions()),
    "audio": ("Transcribe.", [], [str(ASSETS / "speech.flac")], SamplingOptions()),
}


def ask(loaded, name: str) -> list:
    text, images, audio, sampling = REQUESTS[name]
    responses = mlx_gemma3n.stream_generate(
        *loaded, [user_message(text, images, audio)], max_tokens=4, sampling=sampling
    )
    return [r.token for r in responses]


def in_thread(fn, *args):
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn(*args)))
    thread.start()
    thread.join()
    return box["value"]


def main(pattern: str, path: str) -> dict:
    if pattern == "main":  # the reference: everything in the main thread
        loaded = mlx_gemma3n.load(path)
        return {name: ask(loaded, name) for name in REQUESTS}
    if pattern == "load_in_thread":  # load in one thread, each request in another
        loaded = in_thread(mlx_gemma3n.load, path)
        return {name: in_thread(ask, loaded, name) for name in REQUESTS}
    loaded = mlx_gemma3n.load(path)
    if pattern == "warmup":  # a token in the main thread first, then a worker (towers first used there)
        ask(loaded, "text")
        return in_thread(lambda: {name: ask(loaded, name) for name in REQUESTS})
    if pattern == "concurrent":  # every request at once, each in its own thread
        out = {}
        threads = [threading.Thread(target=lambda n=n: out.update({n: ask(loaded, n)})) for n in REQUESTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out
    raise SystemExit(f"unknown pattern {pattern}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
