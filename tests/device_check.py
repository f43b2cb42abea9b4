"""The decode paths against each other on an accelerator (bench/device_run.py runs it first).

The fused kernels have been executed here only by the CPU Metal executor (and compiled by
NVRTC), and steps built ahead of their token rely on in-place row writes reaching the device.
On the default device, the tiny demo model generates greedily (text ids, prompt prefilled in
chunks, across the sliding window several times), in float32 and in bfloat16, by:

- `ahead`:     kernels on, each step built before its token is known (what runs there);
- `serial`:    kernels on, each step reading its row first: must be bit-identical to `ahead`
               (not with --executor, which runs a kernel as its graph is built: before a step
               built ahead has its row);
- `reference`: kernels off (the pure-MLX ops): log-probabilities within TOL (relative to the
               largest) of `ahead` at every step of their common prefix (compared on the same
               tokens: a near-tie may flip a later greedy choice), the first token included;
- `cpu`:       (float32) the first token's log-probabilities on the CPU stream, kernels off,
               within CPU_TOL of `ahead`'s: the device's own ops against MLX-CPU's, so that
               kernels and reference cannot agree on a wrong answer (loose: a GPU's float32
               matmul may round its inputs to TF32).

No kernel may fail its first-use self-check. Prints one JSON line; exits 1 if a check fails.
`--executor` runs the kernels' Metal sources on the CPU executor instead (a machine without
Metal or CUDA, where the kernels would otherwise be off and the check vacuous).

    python tests/device_check.py [--executor]
"""

import argparse
import json
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gemma3n import generation
from mlx_gemma3n.demo import demo_checkpoint
from mlx_gemma3n.generation import generate_step
from mlx_gemma3n.kernels import set_kernels, use_factory
from mlx_gemma3n.loading import load_model

TOL = {"float32": 1e-3, "bfloat16": 5e-2}
CPU_TOL = 1e-2
PROMPT, CHUNK = 40, 16


def generate(model, ids: mx.array, n: int):
    text_vocab = model.config.text_config.vocab_size_per_layer_input
    multimodal = mx.arange(model.config.text_config.vocab_size) >= text_vocab

    def text_only(history, logits):  # the compiled step's ids; a tower id takes another path
        return mx.where(multimodal, -mx.inf, logits)

    steps = generate_step(model, ids, max_tokens=n, prefill_step_size=CHUNK, logits_processors=[text_only])
    tokens, logprobs = [], []
    for token, lp in steps:
        tokens.append(int(token))
        logprobs.append(np.array(lp.astype(mx.float32)).reshape(-1)[:text_vocab])
    return tokens, np.stack(logprobs)


def serial(model, ids: mx.array, n: int):
    """`generate` with every step reading its row first."""
    real = generation.in_place_reads_work
    generation.in_place_reads_work = lambda: False
    try:
        return generate(model, ids, n)
    finally:
        generation.in_place_reads_work = real


def check(dtype: str, n: int, executor: bool) -> dict:
    model = load_model(demo_checkpoint())
    model.language_model.set_dtype(getattr(mx, dtype))
    ids = mx.array(np.random.default_rng(0).integers(3, model.config.text_config.vocab_size_per_layer_input, PROMPT))
    rows_first = serial(model, ids, n)
    # The executor runs a kernel when its graph is built, before a step built ahead has its
    # row: there only the serial path is meaningful.
    ahead = rows_first if executor else generate(model, ids, n)
    same_paths = ahead[0] == rows_first[0] and bool(np.array_equal(ahead[1], rows_first[1]))
    set_kernels(model, False)
    reference = generate(model, ids, n)
    agree = next((i for i, (a, b) in enumerate(zip(ahead[0], reference[0])) if a != b), n)
    scale = np.abs(reference[1][:agree + 1]).max()
    worst = float(np.abs(ahead[1][:agree + 1] - reference[1][:agree + 1]).max() / scale)
    cpu = None
    if dtype == "float32":
        with mx.stream(mx.cpu):
            first = generate(model, ids, 1)[1][0]
        cpu = float(np.abs(ahead[1][0] - first).max() / np.abs(first).max())
    return {
        "dtype": dtype, "tokens": n, "sliding_window": model.config.text_config.sliding_window,
        "in_place_reads_work": generation.in_place_reads_work(),
        "ahead_equals_serial": None if executor else same_paths,
        "kernels_vs_reference_max_rel": worst, "tolerance": TOL[dtype],
        "tokens_agree_until": agree, "first_tokens": ahead[0][:12],
        "device_vs_cpu_first_token_max_rel": cpu, "cpu_tolerance": CPU_TOL,
        "ok": same_paths and worst <= TOL[dtype] and (cpu is None or cpu <= CPU_TOL),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--executor", action="store_true", help="kernels on the CPU Metal executor")
    p.add_argument("--tokens", type=int, default=48)
    args = p.parse_args(argv)
    if args.executor:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import metal_executor

        mx.disable_compile()  # the executor evaluates its inputs: no tracing around it
    with warnings.catch_warnings(record=True) as caught, (
            use_factory(metal_executor.metal_kernel) if args.executor else nullcontext()):
        warnings.simplefilter("always")
        results = [check(dtype, args.tokens, args.executor) for dtype in ("float32", "bfloat16")]
    kernel_warnings = sorted({str(w.message) for w in caught if "kernel" in str(w.message)})
    ok = all(r["ok"] for r in results) and not kernel_warnings
    print(json.dumps({"device": str(mx.default_device()), "mlx": mx.__version__, "executor": args.executor, "ok": ok,
                      "kernel_warnings": kernel_warnings, "checks": results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
