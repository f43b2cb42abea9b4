"""One memory/latency measurement in a fresh process (run by bench/memory.py).

    python bench/worker.py --impl ours|mlx-vlm --model DIR --mode text|vision|audio \
        --prompt 512 --gen 128 --prefill-step 256 --out result.json

Times: load (until the loader returns), ready (load + every loaded weight evaluated), time to
first token (from the request: includes running the image/audio tower, and for us loading
it on first use), prefill and decode rates. Memory: peak RSS (getrusage ru_maxrss and
/proc/self/status VmHWM), RSS split into anonymous and file-backed pages at the end, and MLX's
own peak (`mx.get_peak_memory()`), also after load and after the first token. With --warmup
(text) the rates and the MLX peak are those of a second run, its kernels compiled. With
--prefill-variants (ours, text) the prefill is then timed again under other queueing settings,
with --prefill-profile layer by layer.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

T_START = time.perf_counter()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

MiB = 1 << 20
IMAGE_SIZE = 768
AUDIO_FRAMES = 3000  # 30 s of 10 ms log-mel frames -> 188 soft tokens


def proc_status() -> dict:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem from /proc/self/status, in MiB."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def ru_maxrss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / MiB


def snapshot(tag: str) -> dict:
    s = proc_status()
    return {
        f"{tag}_hwm_mib": s.get("VmHWM"),
        f"{tag}_rss_mib": s.get("VmRSS"),
        f"{tag}_mlx_peak_mib": mx.get_peak_memory() / MiB,
        f"{tag}_mlx_active_mib": mx.get_active_memory() / MiB,
    }


def build_prompt(config: dict, length: int, mode: str, seed: int = 0) -> np.ndarray:
    """Random text ids (< the per-layer vocabulary), with an image or audio block near the
    start for the multimodal modes. Total length is `length` either way."""
    text = config["text_config"]
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, text["vocab_size_per_layer_input"], size=length, dtype=np.int64)
    if mode == "vision":
        block = [config["boi_token_id"]] + [config["image_token_id"]] * config.get(
            "vision_soft_tokens_per_image", 256) + [config["eoi_token_id"]]
    elif mode == "audio":
        block = [config["boa_token_id"]] + [config["audio_token_id"]] * config.get(
            "audio_soft_tokens_per_image", 188) + [config["eoa_token_id"]]
    else:  # text, towers
        return ids
    if len(block) + 8 > length:  # noqa
        raise ValueError(f"prompt of {length} tokens is too short for a {mode} block of {len(block)}")
    ids[4:4 + len(block)] = block
    return ids


def block_prompt(config: dict, mode: str) -> np.ndarray:
    """A prompt that holds one image/audio block and a little text (for --encode-only)."""
    key, default = ("vision_soft_tokens_per_image", 256) if mode == "vision" else ("audio_soft_tokens_per_image", 188)
    return build_prompt(config, config.get(key, default) + 10, mode)


def image_input(size: int = IMAGE_SIZE, seed: int = 0) -> mx.array:
    """One normalised size x size RGB image, NCHW float32 (what the image processors return;
    Gemma 3n's is 768x768)."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.uniform(0, 1, size=(1, 3, size, size)).astype(np.float32))


def audio_input(seed: int = 0):
    """30 s of random log-mel features [1, T, 128] and the valid-frame mask [1, T]."""
    rng = np.random.default_rng(seed)
    feats = mx.array(rng.normal(-4.0, 2.0, size=(1, AUDIO_FRAMES, 128)).astype(np.float32))
    return feats, mx.ones((1, AUDIO_FRAMES), dtype=mx.bool_)


# -- ours -----------------------------------------------------------------------------------


def run_ours(args, result: dict) -> tuple:
    t = time.perf_counter()
    from mlx_gemma3n.generation import generate_step
    from mlx_gemma3n.loading import load_model

    result["import_pkg_s"] = time.perf_counter() - t
    result["package_dir"] = str(Path(sys.modules["mlx_gemma3n"].__file__).parent)  # which tree ran
    result.update(snapshot("after_import"))
    t = time.perf_counter()
    model = load_model(Path(args.model))
    result["load_s"] = time.perf_counter() - t
    if args.float32_text:
        model.language_model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    result["ready_s"] = time.perf_counter() - t
    result.update(snapshot("after_load"))
    _save(args, result)
    config = json.loads((Path(args.model) / "config.json").read_text())
    ids = build_prompt(config, args.prompt, "text" if args.encode_only else args.mode)
    if args.warmup:
        _warm_up(lambda: generate_step(model, mx.array(ids), max_tokens=2, prefill_step_size=args.prefill_step),
                 result)

    t_req = time.perf_counter()
    kwargs = {}
    if args.mode == "towers":
        # Load (not run) every tower and embedder, as mlx-vlm always does: isolates what the
        # lazy parts save without paying for a tower forward pass on MLX-CPU.
        model.require("embed_vision", "vision_tower", "embed_audio", "audio_tower")
        mx.eval(model.parameters())
        result["tower_load_s"] = time.perf_counter() - t_req
        result.update(snapshot("after_towers"))
        t_req = time.perf_counter()
    if args.mode == "vision":
        pixels = image_input(args.image_size)
        feats = model.encode_images(pixels)
        mx.eval(feats)
        kwargs["image_features"] = feats
    elif args.mode == "audio":
        feats, valid = audio_input()
        if args.float32_tower:
            # MLX-CPU's bfloat16 quantized matmul is ~8x slower than float32's (a 30 s clip
            # through the 8-bit tower takes > 25 min); float32 activations over-estimate memory.
            model.require("embed_audio", "audio_tower")
            model.audio_tower.set_dtype(mx.float32)
            model.embed_audio.set_dtype(mx.float32)
        enc = model.encode_audio(feats, valid)
        mx.eval(enc)
        kwargs["audio_features"] = enc
    if kwargs and args.encode_only:
        mx.eval(model.embed_inputs(mx.array(block_prompt(config, args.mode))[None], **kwargs))
        kwargs = {}
    if args.mode in ("vision", "audio"):
        result["encode_s"] = time.perf_counter() - t_req
        result.update(snapshot("after_encode"))
    gen = generate_step(model, mx.array(ids), max_tokens=args.gen, prefill_step_size=args.prefill_step, **kwargs)
    _consume(gen, t_req, result, args)
    return model, ids


def _variant(spec: str) -> tuple:
    """'unit:depth[:chunk]' -> (unit, depth, chunk or None)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("layer", "chunk") or not all(p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"prefill variant {spec!r}: want layer|chunk:DEPTH[:CHUNK]")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


@contextmanager
def _generation_settings():
    """`mlx_gemma3n.generation`, whose prefill settings (PREFILL_UNIT, PREFILL_DEPTH, InFlight)
    the caller may change inside: restored after."""
    from mlx_gemma3n import generation

    saved = {name: getattr(generation, name) for name in ("PREFILL_UNIT", "PREFILL_DEPTH", "InFlight")}
    try:
        yield generation
    finally:
        for name, value in saved.items():
            setattr(generation, name, value)


def _embedded(model, ids) -> tuple:
    """([1, L] ids, their evaluated embeddings) for a prefill."""
    prompt = mx.array(ids)[None]
    embeds = model.embed_inputs(prompt)
    mx.eval(embeds)
    return prompt, embeds


def prefill_variants(model, ids, args) -> list:
    """Ours' prefill of the same prompt under each queueing setting (`generation.PREFILL_UNIT`,
    `PREFILL_DEPTH`, chunk size), in this process after the measured run (kernels compiled),
    the variants interleaved round by round. Per variant: the median time to the last
    position's logits and the largest MLX peak over the memory active before it (weights,
    the prompt's embeddings)."""
    prompt, embeds = _embedded(model, ids)
    times = {v: [] for v in args.prefill_variants}
    peaks = {v: [] for v in args.prefill_variants}
    with _generation_settings() as generation:
        for _ in range(args.variant_rounds):
            for v in args.prefill_variants:
                unit, depth, chunk = v
                generation.PREFILL_UNIT, generation.PREFILL_DEPTH = unit, depth
                cache = model.make_cache()
                mx.synchronize()
                mx.clear_cache()
                active = mx.get_active_memory()
                mx.reset_peak_memory()
                t = time.perf_counter()
                mx.eval(generation.prefill(model, prompt, embeds, cache, chunk or args.prefill_step))
                times[v].append(time.perf_counter() - t)
                peaks[v].append((mx.get_peak_memory() - active) / MiB)
                del cache
    out = []
    for (unit, depth, chunk), ts in times.items():
        median = float(np.median(ts))
        out.append({"unit": unit, "depth": depth, "chunk": chunk or args.prefill_step, "median_s": median,
                    "tok_s": len(ids) / median, "times_s": ts,
                    "peak_over_active_mib": max(peaks[(unit, depth, chunk)])})
    return out


def prefill_profile(model, ids, args) -> dict:
    """Where ours' prefill time goes, layer by layer: one prefill with each layer evaluated
    before the next is built (`PREFILL_DEPTH` 0). Per layer (median over the chunks): the
    host's time to build it and the wait for the device to run it; the last layer that writes
    a cache is queued with the chunk's caches. `end_ms`: from the last queued layer to the
    logits (the last chunk's last such layer, the KV-shared layers at the last position, the
    logits)."""
    marks = []
    prompt, embeds = _embedded(model, ids)
    with _generation_settings() as generation:

        class Timed(generation.InFlight):
            def __call__(self, arrays):
                t = time.perf_counter()
                super().__call__(arrays)
                marks.append((t, time.perf_counter()))

        generation.InFlight, generation.PREFILL_UNIT, generation.PREFILL_DEPTH = Timed, "layer", 0
        cache = model.make_cache()
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(generation.prefill(model, prompt, embeds, cache, args.prefill_step))
        t_end = time.perf_counter()
    c = model.language_model.config
    per_chunk = c.first_kv_shared_layer
    ends = [t0] + [end for _, end in marks]
    layers = []
    for i in range(per_chunk):
        units = range(i, len(marks), per_chunk)
        layers.append({
            "layer": i, "type": c.layer_types[i], "sparse": c.activation_sparsity_pattern[i] > 0,
            "build_ms": 1e3 * float(np.median([marks[k][0] - ends[k] for k in units])),
            "wait_ms": 1e3 * float(np.median([marks[k][1] - marks[k][0] for k in units])),
        })
    return {"total_s": t_end - t0, "chunks": -(-len(marks) // per_chunk), "layers": layers,
            "end_ms": 1e3 * (t_end - ends[-1])}


# -- mlx-vlm --------------------------------------------------------------------------------


def run_mlx_vlm(args, result: dict) -> None:
    t = time.perf_counter()
    import mlx_vlm
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.utils import load_model

    result["import_pkg_s"] = time.perf_counter() - t
    result.update(snapshot("after_import"))
    result["mlx_vlm_version"] = getattr(mlx_vlm, "__version__", "?")
    t = time.perf_counter()
    # lazy=False is what mlx_vlm.load() does; cast before evaluating, as for ours.
    model = load_model(Path(args.model), lazy=args.float32_text)
    if args.float32_text:
        model.language_model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    result["load_s"] = time.perf_counter() - t
    result["ready_s"] = result["load_s"]
    result.update(snapshot("after_load"))
    _save(args, result)
    config = json.loads((Path(args.model) / "config.json").read_text())
    ids = build_prompt(config, args.prompt, "text" if args.encode_only else args.mode)
    if args.warmup:
        _warm_up(lambda: generate_step(mx.array(ids)[None], model, None, None, max_tokens=2, temperature=0.0,
                                       prefill_step_size=args.prefill_step), result)

    t_req = time.perf_counter()
    pixels, kwargs = None, {}
    if args.mode == "vision":
        pixels = image_input(args.image_size)
    elif args.mode == "audio":
        feats, valid = audio_input()
        kwargs = {"input_features": feats, "input_features_mask": valid}
    if args.encode_only and args.mode in ("vision", "audio"):
        embedded = model.get_input_embeddings(mx.array(block_prompt(config, args.mode))[None], pixels, **kwargs)
        mx.eval(embedded.inputs_embeds, embedded.per_layer_inputs)
        del embedded
        pixels, kwargs = None, {}
        result["encode_s"] = time.perf_counter() - t_req
        result.update(snapshot("after_encode"))
    gen = generate_step(
        mx.array(ids)[None], model, pixels, None, max_tokens=args.gen, temperature=0.0,
        prefill_step_size=args.prefill_step, **kwargs,
    )
    _consume(gen, t_req, result, args)


def _warm_up(start, result: dict) -> None:
    """Two tokens after the same prompt first, so that the measured run finds its kernels
    compiled (MLX-CUDA compiles each new shape on first use: 60-110 s for a whole model) and
    ours' decode step traced; then the allocator's cache is emptied and the MLX peak reset, so
    that the peak reported is the measured run's. The first token's and the second's times
    are kept (from the start of the warm-up): what the prefill compiles, then the first decode
    step."""
    t = time.perf_counter()
    for n, _ in enumerate(start(), 1):
        result[f"warmup_token{n}_s"] = time.perf_counter() - t
        if n == 2:
            break
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    result["warmup_s"] = time.perf_counter() - t
    result.update(snapshot("after_warmup"))


def _save(args, result: dict) -> None:
    """Partial results, so that a run killed by its timeout still reports what it got."""
    partial = dict(result, ok=False, error="incomplete (killed or timed out)")
    s = proc_status()
    partial.update(peak_rss_mib=ru_maxrss_mib(), vm_hwm_mib=s.get("VmHWM"), mlx_peak_mib=mx.get_peak_memory() / MiB)
    args.out.write_text(json.dumps(partial, indent=2))


def _consume(gen, t_req: float, result: dict, args) -> None:
    tokens, t_first = [], None
    for tok, logprobs in gen:
        if t_first is None:
            # The token id is what a caller sees first. Do not evaluate `logprobs` before
            # taking the time: ours yields a lazy slice that MLX queues behind the next
            # step, already in flight, so evaluating it waits for one more decode step.
            t_first = time.perf_counter()
            result["ttft_s"] = t_first - t_req
            first_logprobs = logprobs
            result.update(snapshot("after_first_token"))
            _save(args, result)
        tokens.append(int(tok))
        if len(tokens) >= args.gen:
            break
    t_end = time.perf_counter()
    if t_first is not None:
        result["first_logprobs_finite"] = bool(mx.all(mx.isfinite(first_logprobs)).item())
    result["generated"] = len(tokens)
    result["prefill_tok_s"] = args.prompt / (result["ttft_s"] - result.get("encode_s", 0.0))
    if len(tokens) > 1:
        result["decode_tok_s"] = (len(tokens) - 1) / (t_end - t_first)
    result["gen_total_s"] = t_end - t_req
    result["tokens_head"] = tokens[:8]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "mlx-vlm"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=("text", "towers", "vision", "audio"), default="text")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--prefill-step", type=int, required=True, help="tokens per prefill chunk, both implementations")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    p.add_argument("--float32-tower", action="store_true", help="ours, audio: run the tower in float32")
    p.add_argument(
        "--float32-text",
        action="store_true",
        help="both: cast the decoder's float parameters (norms, quantization scales) to float32 so that "
        "it runs in float32, where MLX-CPU's quantized matmul is ~8x faster than in bfloat16",
    )
    p.add_argument(
        "--encode-only",
        action="store_true",
        help="vision/audio: run the tower and embed a prompt holding its block, then generate "
        "from a text-only --prompt (a prompt with the block is too long to prefill on MLX-CPU)",
    )
    p.add_argument("--warmup", action="store_true",
                   help="text: generate two tokens after the same prompt first, untimed (kernel compilation)")
    p.add_argument("--prefill-variants", type=lambda v: [_variant(x) for x in v.split(",")], default=[],
                   help="ours, text: after the measured run, time the prefill under each of these "
                   "comma-separated settings, unit:depth[:chunk] (unit layer|chunk)")
    p.add_argument("--variant-rounds", type=int, default=3)
    p.add_argument("--prefill-profile", action="store_true",
                   help="ours, text: after the measured run, one prefill evaluated layer by layer, timed per layer")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.warmup and args.mode != "text":
        p.error("--warmup is for --mode text")
    if (args.prefill_variants or args.prefill_profile) and (args.impl != "ours" or args.mode != "text"):
        p.error("--prefill-variants and --prefill-profile are for --impl ours --mode text")

    result = {
        "impl": args.impl, "model": args.model, "mode": args.mode, "prompt": args.prompt,
        "gen_requested": args.gen, "prefill_step": args.prefill_step, "encode_only": args.encode_only,
        "float32_tower": args.float32_tower, "float32_text": args.float32_text, "warmup": args.warmup,
        "image_size": args.image_size if args.mode == "vision" else None,
        "import_s": time.perf_counter() - T_START,
        "mlx_version": mx.__version__, "device": str(mx.default_device()),
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "pid": os.getpid(),
        "python": platform.python_version(),
    }
    result.update(snapshot("start"))
    mx.reset_peak_memory()
    ran = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. a kernel failing its self-check
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            ran = (run_ours if args.impl == "ours" else run_mlx_vlm)(args, result)
            result["ok"] = True
        except Exception as e:  # recorded, not hidden: the report prints it
            result["ok"] = False
            result["error"] = f"{type(e).__name__}: {e}"
            result["traceback"] = traceback.format_exc()[-4000:]
    result["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    s = proc_status()
    result.update(
        peak_rss_mib=ru_maxrss_mib(), vm_hwm_mib=s.get("VmHWM"), end_rss_mib=s.get("VmRSS"),
        end_rss_anon_mib=s.get("RssAnon"), end_rss_file_mib=s.get("RssFile"),
        mlx_peak_mib=mx.get_peak_memory() / MiB, end_mlx_active_mib=mx.get_active_memory() / MiB,
        mlx_cache_mib=mx.get_cache_memory() / MiB,
    )
    for wanted, name, measure in ((args.prefill_variants, "prefill_variants", prefill_variants),
                                  (args.prefill_profile, "prefill_profile", prefill_profile)):
        if wanted and ran:  # after the run's own figures are taken
            args.out.write_text(json.dumps(result, indent=2))
            try:
                result[name] = measure(*ran, args)
            except Exception as e:
                result[f"{name}_error"] = f"{type(e).__name__}: {e}"
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}))


if __name__ == "__main__":
    main()
