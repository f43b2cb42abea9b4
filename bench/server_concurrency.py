"""Why the server queues requests instead of batching them, measured.

1. End to end: a real `python -m mlx_gemma3n.server` on `--model` answers one request alone,
   then `--clients` identical-length requests at once (queued: each waits for those before it).
2. What batching could buy: the time of one decode step at batch 1 and at batch `--clients`,
   on the served model (in this process) and on one E2B decoder layer's projections, 4-bit
   and float32 (the weights that dominate a real decode step). If a step of B sequences costs B times a step of
   one, batching gives no throughput, only the complexity of per-row masks and cache offsets.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python bench/server_concurrency.py --model demo --clients 4 --tokens 64
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_gemma3n import load
from mlx_gemma3n.generation import prefill

E2B_LAYER = {"q": (2048, 2048), "k": (2048, 512), "v": (2048, 512), "o": (2048, 2048),
             "gate": (2048, 8192), "up": (2048, 8192), "down": (8192, 2048)}


def _post(url: str, prompt: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0.8, "seed": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode())
    t = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as r:
        reply = json.loads(r.read())
    return {"seconds": round(time.perf_counter() - t, 3), "tokens": reply["usage"]["completion_tokens"]}


def end_to_end(model: str, clients: int, tokens: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlx_gemma3n.server", "--model", model, "--port", str(port),
                               "--log-level", "warning"])
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "server exited"
                time.sleep(0.5)
        _post(url, "warm up", 4)
        alone = _post(url, "prompt number 0", tokens)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            together = list(pool.map(lambda i: _post(url, f"prompt number {i}", tokens), range(clients)))
        wall = time.perf_counter() - t
    finally:
        server.terminate()
        server.wait()
    generated = sum(r["tokens"] for r in together)
    return {"alone": alone, "alone_tok_s": alone["tokens"] / alone["seconds"],
            "concurrent": sorted(together, key=lambda r: r["seconds"]), "concurrent_wall_s": wall,
            "concurrent_tok_s": generated / wall}


def _time(step, repeats: int) -> float:
    step()  # warm up
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t) / repeats


def model_step(model, batch: int, repeats: int) -> float:
    ids = mx.array(np.random.default_rng(0).integers(10, 200, (batch, 16)))
    cache = model.make_cache()
    token = mx.argmax(prefill(model, ids, model.embed_inputs(ids), cache), axis=-1)[:, None]
    mx.eval(token)

    def step():
        mx.eval(mx.argmax(model(token, cache=cache)[:, -1], axis=-1))

    return _time(step, repeats)


def e2b_layer_step(batch: int, repeats: int, bits: int) -> float:
    """One E2B decoder layer's projections for `batch` tokens: 4-bit, or float32 if bits=0."""
    layers = [nn.Linear(d_in, d_out, bias=False) for d_in, d_out in E2B_LAYER.values()]
    if bits:
        layers = [nn.QuantizedLinear.from_linear(layer, group_size=64, bits=bits) for layer in layers]
    mx.eval([layer.parameters() for layer in layers])
    x = {d: mx.random.normal((batch, 1, d)) for d in (2048, 8192)}
    inputs = [x[d_in] for d_in, _ in E2B_LAYER.values()]

    def step():
        mx.eval([layer(h) for layer, h in zip(layers, inputs)])

    return _time(step, repeats)


def batch_ratio(step, clients: int, rounds: int = 3) -> dict:
    """Best-of-`rounds` step time at batch 1 and batch `clients`, interleaved (the machine is
    shared, so load drifts)."""
    times = {1: [], clients: []}
    for _ in range(rounds):
        for b in times:
            times[b].append(step(b))
    one, many = min(times[1]), min(times[clients])
    return {"batch_1_s": one, f"batch_{clients}_s": many, "batch_cost_ratio": many / one}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    report = {"model": args.model, "clients": args.clients, "tokens": args.tokens,
              "end_to_end": end_to_end(args.model, args.clients, args.tokens)}
    model, _ = load(args.model)
    report["model_decode_step"] = batch_ratio(lambda b: model_step(model, b, args.repeats), args.clients)
    for bits, name in ((4, "e2b_layer_4bit"), (0, "e2b_layer_float32")):
        report[name] = batch_ratio(lambda b: e2b_layer_step(b, args.repeats, bits), args.clients)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
