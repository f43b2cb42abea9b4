"""Host time per decode step: ours (before and after the compiled step) and mlx-vlm.

A decode step's host time runs from the sampled token being available on the host to the
next step queued (reading the token's per-layer-embedding rows and the sampler's
bookkeeping included); its evaluation time from there to the next token being available.
Every implementation is driven the same way, serially, in a fresh process on the same
benchmark checkpoint (bench/memory.py builds and converts them):

    host:     token id in hand -> the step built and its token sampled (lazily)
    dispatch: mx.async_eval(token, log-probabilities) returns (the step is queued)
    eval:     -> the next token id in hand (.item())

Host time is build + dispatch where queueing is asynchronous (Metal, CUDA). MLX-CPU
throttles it: async_eval blocks while more than a few dozen of the step's tasks are
pending, so its dispatch time holds most of the step's evaluation and is reported apart;
host time here is the build alone. On a shared machine the wall-clock build also counts
the time other processes hold the cores, so the main thread's CPU time is reported too.

- ours      `generation.Decoder`, exactly what `generate_step` runs per token;
- before    the loop body of `generate_step` at --before-ref (the commit before the compiled
            step), run from that commit's package (`git archive`): `model(token, cache)`, the
            history concatenated, log-softmax, argmax;
- mlx-vlm   the body of mlx-vlm 0.7.10's `generate_step._step` for one token (its language
            model on its cache in its generation stream, log-softmax, its greedy sampler).

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
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("BENCH_CACHE", "/work/bench-cache"))
BEFORE_REF = "5557004"  # the last commit before the compiled decode step
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


def _fill(cache: list, text: dict, context: int, dtype: mx.Dtype) -> None:
    """`context` positions in every cache: a prompt chunk, then its last token alone."""
    shape = (1, text["num_key_value_heads"], context - 1, text["head_dim"])
    k, v = (mx.random.normal(shape).astype(dtype) for _ in range(2))
    for c in cache:
        c.update_and_fetch(k, v)
        c.update_and_fetch(k[:, :, -1:], v[:, :, -1:])
    mx.eval([x for c in cache for x in (c.keys, c.values)])


def _steps(impl: str, model, cache: list, history: mx.array):
    """step(token [1], token id) -> (next token, log-probabilities), lazy."""
    if impl == "ours":
        from mlx_gemma3n.generation import Decoder

        return Decoder(model, cache, history)
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


def worker(args) -> dict:
    t = time.perf_counter()
    model = _load(args.worker, args.model, args.float32)
    load_s = time.perf_counter() - t
    text = json.loads((args.model / "config.json").read_text())["text_config"]
    dtype = mx.float32 if args.float32 else mx.bfloat16
    cache = model.language_model.make_cache() if args.worker == "mlx-vlm" else model.make_cache()
    _fill(cache, text, args.context, dtype)
    rng = np.random.default_rng(0)
    token_id = int(rng.integers(3, text["vocab_size_per_layer_input"]))
    token = mx.array([token_id])
    step = _steps(args.worker, model, cache, mx.array(rng.integers(3, 1000, 8)))
    times, ids = {"host": [], "host_cpu": [], "dispatch": [], "eval": []}, []
    for _ in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        token, logprobs = step(token, token_id)
        t1, c1 = time.perf_counter(), time.thread_time()
        mx.async_eval(token, logprobs)
        t2 = time.perf_counter()
        token_id = token.item()
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, c1 - c0, t2 - t1, t3 - t2)):
            times[key].append(dt * 1e3)
        ids.append(token_id)
    out = {"impl": args.worker, "load_s": load_s, "context": args.context, "cache_offset_end": cache[0].offset,
           "tokens": ids[:8]}
    for key, ms in times.items():
        out[f"{key}_ms"] = statistics.median(ms[args.warmup:])
        out[f"first_step_{key}_ms"] = ms[0]
        out[f"{key}_ms_all"] = ms
    return out


# -- driver ---------------------------------------------------------------------------------


def _export(ref: str, into: Path) -> Path:
    """The package as it was at `ref`, for the 'before' run."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "mlx_gemma3n"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _run(impl: str, model: Path, args, pythonpath: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", str(model), "--context", str(args.context),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + ([] if args.float32 else ["--as-stored"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pythonpath), str(REPO)]))
    print(f"[{args.shape}] {impl} ...", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if r.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", choices=("E2B", "E4B"), default="E2B")
    p.add_argument("--cache-dir", type=Path, default=CACHE, help="where bench/memory.py put the 4-bit checkpoints")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--before-ref", default=BEFORE_REF, help="git ref of the package measured as 'before'")
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
    with tempfile.TemporaryDirectory() as tmp:
        old = _export(args.before_ref, Path(tmp))
        for impl in args.impls.split(","):
            model = args.cache_dir / f"{args.shape}-{dirs[impl]}-4bit"
            if not (model / "config.json").is_file():
                raise SystemExit(f"no checkpoint at {model}: build it with bench/memory.py --shape {args.shape}")
            results[impl] = _run(impl, model, args, old if impl == "before" else REPO)
    print(f"\n{args.shape} 4-bit, {args.context}-token context, {'float32' if args.float32 else 'stored dtype'}, "
          f"median of {args.steps} steps; mlx {mx.__version__}, {mx.default_device()}")
    print(f"{'impl':<8} {'host ms':>8} {'host CPU ms':>12} {'dispatch ms':>12} {'eval ms':>9} {'first step host ms':>19}")
    for impl, r in results.items():
        print(f"{impl:<8} {r['host_ms']:>8.2f} {r['host_cpu_ms']:>12.2f} {r['dispatch_ms']:>12.1f} {r['eval_ms']:>9.1f} "
              f"{r['first_step_host_ms']:>19.1f}")
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
