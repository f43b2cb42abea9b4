"""Host time per decode step: ours (before and after the compiled step) and mlx-vlm.

A decode step's host time runs from the sampled token being available on the host to the
next step queued (reading the token's per-layer-embedding rows and the sampler's
bookkeeping included); its evaluation time from there to the next token being available.
Every implementation runs in a fresh process on the same benchmark checkpoint
(bench/memory.py builds and converts them), one token per step:

- ours      exactly what `generate_step` runs per token: the step after the token was
            built (`Decoder.prepare`) while the token was computing, so once its id is in
            hand the host reads its row into the built step (`Decoder.dispatch`) and queues
            it; then it builds the step after, overlapping that step's evaluation:
              host:     token id in hand -> the step runnable (row read in, caches advanced)
              dispatch: mx.async_eval(token, log-probabilities)
              build:    `Decoder.prepare` of the following step (overlapped, not on the path)
              eval:     -> the next token id in hand (.item())
- before    the loop body `generate_step` had before the compiled step (commit 5557004):
            `model(token, cache)` uncompiled, the history concatenated, log-softmax, argmax;
            on today's model code (5557004's loader cannot read today's checkpoints: the
            sparse layers' down_proj is stored transposed since);
- mlx-vlm   the body of mlx-vlm 0.7.10's `generate_step._step` for one token (its language
            model on its cache in its generation stream, log-softmax, its greedy sampler).
  For these two, driven serially: host = the step built and its token sampled (lazily) from
  the token id in hand, then dispatch and eval as above. (mlx-vlm's own loop builds a step
  from the previous, lazy token, overlapping that build with evaluation; its host share
  after a token is then its dispatch.)

MLX-CPU throttles `async_eval`: it blocks while more than a few dozen of the step's tasks are
pending, so its dispatch time holds most of the step's evaluation and is reported apart;
host time here excludes it. On a shared machine the wall clock also counts the time other
processes hold the cores, so the main thread's CPU time is reported too, and each step's
whole period ("step ms", token id to next token id) is given for every implementation.

The context is synthetic: each cache is filled through its own `update_and_fetch` with
random keys/values for --context positions (a 512-token prefill of E2B takes ~9 minutes per
implementation on MLX-CPU, and a step's work does not depend on what the keys hold).
Decoders run in float32 by default (MLX-CPU's bfloat16 quantized matmul is ~8x slower).
Medians over --steps steps after --warmup steps (the first of ours traces and compiles).

    nice python bench/host_time.py --shape E2B        # last line:
    E2B host ms per step: ours X (before Y), mlx-vlm Z
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from synthetic_context import fill_cache

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache"))
IMPLS = ("before", "ours", "mlx-vlm")


# -- worker (one implementation, fresh process) ---------------------------------------------


def _load(impl: str, model_dir: Path, float32: bool):
    if impl == "mlx-vlm":
        from mlx_vlm.utils import load_model

        model = load_model(model_dir, lazy=True)
    else:
        from mlx_gemma3n.loading import load_model

        model = load_model(model_dir)
    if float32:
        model.language_model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _serial(impl: str, model, cache: list, history: mx.array):
    """step(token [1], token id) -> (next token, log-probabilities), lazy."""
    if impl == "before":
        state = {"history": history}

        def before(token, token_id):
            state["history"] = mx.concatenate([state["history"], token])
            logits = model(token[None], cache=cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return mx.argmax(logprobs, axis=-1), logprobs

        return before
    from mlx_vlm.generate.common import generation_stream
    from mlx_vlm.sample_utils import make_sampler

    sampler = make_sampler(temp=0.0)

    def vlm(token, token_id):
        with mx.stream(generation_stream):
            logits = model.language_model(token[None], cache=cache, logits_to_keep=1).logits[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs

    return vlm


def _laps():
    """A lap timer: each call returns the wall and main-thread CPU ms since the last."""
    last = [time.perf_counter(), time.thread_time()]

    def lap():
        now = [time.perf_counter(), time.thread_time()]
        wall, cpu = ((a - b) * 1e3 for a, b in zip(now, last))
        last[:] = now
        return wall, cpu

    return lap


def _drive_ours(model, cache, history, token, token_id, n):
    """`generate_step`'s loop, timed per phase; yields (phase times, next token id)."""
    from mlx_gemma3n.generation import Decoder

    decoder = Decoder(model, cache, history)
    assert decoder.step.ahead, "in-place row reads do not work on this device"
    ahead = decoder.prepare(token)
    for _ in range(n):
        lap = _laps()
        token, logprobs = decoder.dispatch(ahead, token, token_id)
        host = lap()
        mx.async_eval(token, logprobs)
        dispatch = lap()[0]
        ahead = decoder.prepare(token)
        build = lap()
        token_id = token.item()
        yield {"host": host[0], "host_cpu": host[1], "dispatch": dispatch, "build": build[0],
               "build_cpu": build[1], "eval": lap()[0]}, token_id


def _drive_serial(impl, model, cache, history, token, token_id, n):
    step = _serial(impl, model, cache, history)
    for _ in range(n):
        lap = _laps()
        token, logprobs = step(token, token_id)
        host = lap()
        mx.async_eval(token, logprobs)
        dispatch = lap()[0]
        token_id = token.item()
        yield {"host": host[0], "host_cpu": host[1], "dispatch": dispatch, "eval": lap()[0]}, token_id


def worker(args) -> dict:
    t = time.perf_counter()
    model = _load(args.worker, args.model, args.float32)
    load_s = time.perf_counter() - t
    text = json.loads((args.model / "config.json").read_text())["text_config"]
    dtype = mx.float32 if args.float32 else mx.bfloat16
    cache = model.language_model.make_cache() if args.worker == "mlx-vlm" else model.make_cache()
    fill_cache(cache, text["num_key_value_heads"], text["head_dim"], args.context, dtype, last_alone=True)
    rng = np.random.default_rng(0)
    token_id = int(rng.integers(3, text["vocab_size_per_layer_input"]))
    history = mx.array(rng.integers(3, 1000, 8))
    n = args.warmup + args.steps
    drive = _drive_ours if args.worker == "ours" else partial(_drive_serial, args.worker)
    times, ids = {}, []
    for phases, token_id in drive(model, cache, history, mx.array([token_id]), token_id, n):
        phases["step"] = sum(v for k, v in phases.items() if not k.endswith("_cpu"))
        for key, ms in phases.items():
            times.setdefault(key, []).append(ms)
        ids.append(token_id)
    out = {"impl": args.worker, "load_s": load_s, "context": args.context, "cache_offset_end": cache[0].offset,
           "tokens": ids[:8]}
    for key, ms in times.items():
        out[f"{key}_ms"] = statistics.median(ms[args.warmup:])
        out[f"first_step_{key}_ms"] = ms[0]
        out[f"{key}_ms_all"] = ms
    return out


# -- driver ---------------------------------------------------------------------------------


def _run(impl: str, model: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", str(model), "--context", str(args.context),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + ([] if args.float32 else ["--as-stored"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    print(f"[{args.shape}] {impl} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if r.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", choices=("E2B", "E4B", "tiny"), default="E2B")
    p.add_argument("--cache-dir", type=Path, default=CACHE, help="where bench/memory.py put the 4-bit checkpoints")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--as-stored", dest="float32", action="store_false",
                   help="run the decoders in their stored dtype (bfloat16) instead of float32")
    p.add_argument("--results", type=Path, help="JSON output")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    dirs = {"ours": "ours", "before": "ours", "mlx-vlm": "mlxvlm"}
    results = {}
    for impl in args.impls.split(","):
        model = args.cache_dir / f"{args.shape}-{dirs[impl]}-4bit"
        if not (model / "config.json").is_file():
            raise SystemExit(f"no checkpoint at {model}: build it with bench/memory.py --shape {args.shape}")
        results[impl] = _run(impl, model, args)
    print(f"\n{args.shape} 4-bit, {args.context}-token context, {'float32' if args.float32 else 'stored dtype'}, "
          f"median of {args.steps} steps; mlx {mx.__version__}, {mx.default_device()}")
    print(f"{'impl':<8} {'host ms':>8} {'host CPU ms':>12} {'dispatch ms':>12} {'build ms (overlapped)':>22} "
          f"{'eval ms':>8} {'step ms':>8}")
    for impl, r in results.items():
        build = f"{r['build_ms']:.2f}" if "build_ms" in r else "-"
        print(f"{impl:<8} {r['host_ms']:>8.2f} {r['host_cpu_ms']:>12.2f} {r['dispatch_ms']:>12.1f} {build:>22} "
              f"{r['eval_ms']:>8.1f} {r['step_ms']:>8.1f}")
    if args.results:
        args.results.write_text(json.dumps({"args": vars(args) | {"cache_dir": str(args.cache_dir),
                                                                   "results": str(args.results)},
                                            "results": results}, indent=2, default=str))
    c = {k: results[k]["host_cpu_ms"] if k in results else float("nan") for k in IMPLS}
    print(f"{args.shape} host CPU ms per step (main thread): ours {c['ours']:.2f} (before {c['before']:.2f}), "
          f"mlx-vlm {c['mlx-vlm']:.2f}")
    h = {k: results[k]["host_ms"] if k in results else float("nan") for k in IMPLS}
    print(f"{args.shape} host ms per step: ours {h['ours']:.2f} (before {h['before']:.2f}), mlx-vlm {h['mlx-vlm']:.2f}")


if __name__ == "__main__":
    main()
