"""Memory benchmark: load time, time to first token, peak RSS and peak MLX memory, ours vs mlx-vlm.

For each shape (E2B, E4B; `tiny` for a cheap dry run) it builds -- once, cached outside git --
a random-weight HF checkpoint with the real names and shapes (bench/make_checkpoint.py),
converts it at 4-bit with our converter and with mlx-vlm's, and measures every configuration
in a fresh subprocess (bench/worker.py) so that each peak RSS is clean:

  variants  4bit  ours: `python -m convert -q` (4-bit decoder, 8-bit PLE file, 8-bit audio
                  tower linears, vision tower bf16)
                  mlx-vlm: its own `convert -q` of the same HF checkpoint (4-bit everything
                  it quantizes, towers left in bf16)
            bf16  both loaders read the bf16 HF checkpoint directly (no converted copy: disk)
  modes     text; towers (every tower loaded, as mlx-vlm always does, text run); audio (30 s
            clip through the audio tower), vision (one image through the vision tower); with
            --encode-only the tower embeds a prompt holding its block and the text run is
            text-only (a prompt with the block is too long to prefill on MLX-CPU)
  point     --prompt/--gen (default 512 + 128), and the 2K-context point --ctx-prompt/--ctx-gen
            (default 1920 + 128, 4-bit text only) that the RSS targets are stated for.

Prints a table with ratios ours / mlx-vlm and writes all numbers as JSON.

    nice -n 10 python bench/memory.py --shape tiny                       # dry run
    nice -n 10 python bench/memory.py --shape E2B --shape E4B
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from make_checkpoint import SHAPES, build  # noqa: E402

from mlx_gemma3n.generation import PREFILL_CHUNK  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
SPEC_PROMPT, SPEC_GEN = 512, 128
MiB = 1 << 20
GB = 1e9
# Targets from issue #3 (peak RSS, 4-bit text generation at a 2K context), in bytes.
RSS_TARGETS = {"E2B": 1.8 * GB, "E4B": 2.8 * GB}


# -- environment ----------------------------------------------------------------------------


def machine_info(openblas: bool) -> dict:
    mem = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("mlx", "mlx-cpu", "mlx-lm", "mlx-vlm", "mlx-gemma3n", "transformers", "torch", "numpy"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": mem.get("MemTotal"),
        "ram_available_bytes_at_start": mem.get("MemAvailable"),
        "python": platform.python_version(),
        "backend": "MLX CPU" if sys.platform != "darwin" else "MLX (Metal)",
        "ld_preload_openblas": openblas,
        "versions": versions,
        "git_head": _git_head(),
    }


def _git_head():
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def warm_page_cache(path: Path) -> float:
    """Read every file of a checkpoint once so that load times are warm-cache for everyone."""
    t = time.perf_counter()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return time.perf_counter() - t


def run_child(cmd, env, timeout: float, log: Path):
    """Run `cmd` with its own rusage (os.wait4): (returncode, wall s, peak RSS bytes, timed_out)."""
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, time.perf_counter() - t, usage.ru_maxrss * 1024, False
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                return None, time.perf_counter() - t, usage.ru_maxrss * 1024, True
            time.sleep(0.2)


# -- checkpoints ----------------------------------------------------------------------------


def prepare(shape: str, cache: Path, impls, variants, env, timeout, logs: Path) -> dict:
    """HF checkpoint and the 4-bit conversions: {(impl, variant): dir}, plus conversion stats."""
    info = {"dirs": {}, "conversions": {}}
    hf = cache / f"{shape}-hf"
    t = time.perf_counter()
    existed = (hf / "model.safetensors.index.json").is_file()
    build(shape, hf)
    info["hf"] = {"path": str(hf), "bytes": dir_bytes(hf), "built_s": None if existed else time.perf_counter() - t}
    for impl in impls:
        if "bf16" in variants:
            info["dirs"][f"{impl}/bf16"] = str(hf)
        if "4bit" not in variants:
            continue
        out = cache / f"{shape}-{'ours' if impl == 'ours' else 'mlxvlm'}-4bit"
        conv = {"path": str(out)}
        if not (out / "config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            if impl == "ours":
                cmd = [sys.executable, "-m", "convert", "--hf-path", str(hf), "--mlx-path", str(out), "-q"]
            else:
                cmd = [sys.executable, str(HERE / "vlm_convert.py"), "--hf-path", str(hf), "--mlx-path", str(out), "-q"]
            print(f"[{shape}] converting for {impl}: {' '.join(cmd[1:])}", flush=True)
            rc, wall, peak, timed_out = run_child(cmd, env, timeout, logs / f"{shape}-convert-{impl}.log")
            conv.update(command=" ".join(cmd[1:]), seconds=wall, peak_rss_bytes=peak, returncode=rc)
            if rc != 0:
                conv["error"] = "timed out" if timed_out else _tail(logs / f"{shape}-convert-{impl}.log")
                shutil.rmtree(out, ignore_errors=True)
                info["conversions"][impl] = conv
                print(f"[{shape}] conversion for {impl} FAILED: {conv['error'][-500:]}", flush=True)
                continue
        else:
            conv["cached"] = True
        conv["bytes"] = dir_bytes(out)
        info["conversions"][impl] = conv
        info["dirs"][f"{impl}/4bit"] = str(out)
    return info


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# -- runs -----------------------------------------------------------------------------------


def plan_runs(args) -> list:
    runs = []
    for variant in args.variants:
        gen = args.bf16_gen if variant == "bf16" and args.bf16_gen is not None else args.gen
        for mode in (args.bf16_modes if variant == "bf16" else args.modes):
            for impl in args.impls:
                if mode == "towers" and impl == "mlx-vlm":
                    continue  # mlx-vlm always loads every tower: its "text" run is this one
                runs.append(dict(variant=variant, mode=mode, impl=impl, prompt=args.prompt, gen=gen))
    if args.ctx_prompt and "4bit" in args.variants:
        for impl in args.impls:
            runs.append(dict(variant="4bit", mode="text", impl=impl, prompt=args.ctx_prompt, gen=args.ctx_gen))
    return runs


def measure(shape, run, model_dir, env, args, logs: Path) -> dict:
    tag = f"{shape}-{run['variant']}-{run['mode']}-{run['impl']}-p{run['prompt']}g{run['gen']}"
    out = logs / f"{tag}.json"
    out.unlink(missing_ok=True)
    warm_s = warm_page_cache(Path(model_dir)) if args.warm_cache else None
    cmd = [sys.executable, str(HERE / "worker.py"), "--impl", run["impl"], "--model", str(model_dir),
           "--mode", run["mode"], "--prompt", str(run["prompt"]), "--gen", str(run["gen"]),
           "--prefill-step", str(args.prefill_step), "--image-size", str(args.image_size), "--out", str(out)]
    cmd += ["--encode-only"] if args.encode_only else []
    cmd += ["--float32-text"] if args.float32_text else []
    print(f"[{shape}] {tag} ...", flush=True)
    rc, wall, child_peak, timed_out = run_child(cmd, env, args.timeout, logs / f"{tag}.log")
    result = dict(run, shape=shape, model_dir=str(model_dir), wall_s=wall, child_ru_maxrss_bytes=child_peak,
                  page_cache_warm_s=warm_s)
    if out.is_file():
        result.update(json.loads(out.read_text()))
    else:
        result.update(ok=False, error=("timed out after %ds" % args.timeout) if timed_out
                      else f"worker exited {rc}: {_tail(logs / f'{tag}.log')}")
    if timed_out:
        result.update(ok=False, error=f"timed out after {args.timeout:.0f}s (partial numbers kept)")
    status = "ok" if result.get("ok") else f"FAILED: {str(result.get('error'))[:300]}"
    print(f"[{shape}] {tag}: {status}; peak RSS {_gb(result.get('peak_rss_mib'))}, "
          f"MLX peak {_gb(result.get('mlx_peak_mib'))}, load {_s(result.get('ready_s'))}, "
          f"TTFT {_s(result.get('ttft_s'))}, wall {wall:.0f}s", flush=True)
    return result


def _f(x, width, prec):
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{prec}f}"


def _gb(mib):
    return "-" if mib is None else f"{mib * MiB / GB:.2f} GB"


def _s(x):
    return "-" if x is None else f"{x:.1f}s"


# -- report ---------------------------------------------------------------------------------


def _label(r) -> str:
    reduced = (r["prompt"], r["gen"]) != (SPEC_PROMPT, SPEC_GEN) and (r["prompt"], r["gen"]) != (1920, 128)
    extra = " (REDUCED)" if reduced else ""
    if r.get("mode") == "vision" and r.get("image_size") not in (None, 768):
        extra += f" img {r['image_size']}px (REDUCED)"
    if r.get("encode_only") and r.get("mode") in ("vision", "audio"):
        extra += " encode-only"
    return f"{r['variant']:<4} {r['mode']:<6} {r['prompt']:>4}+{r['gen']:<3}{extra}"


def table(results: list) -> str:
    """One row per configuration, ours and mlx-vlm side by side, with ratios ours/mlx-vlm."""
    lines = []
    by_key = {}
    for r in results:
        by_key.setdefault((r["shape"], r["variant"], r["mode"], r["prompt"], r["gen"]), {})[r["impl"]] = r
    hdr = (f"{'shape':<5} {'config':<30} {'impl':<8} {'load s':>7} {'TTFT s':>7} {'pre t/s':>8} {'dec t/s':>8} "
           f"{'peakRSS GB':>10} {'(-import)':>9} {'MLXpeak GB':>10} {'anon/file GB':>13}  note")
    lines += [hdr, "-" * len(hdr)]
    for key, pair in by_key.items():
        if key[2] == "towers" and "mlx-vlm" not in pair:
            text = by_key.get((key[0], key[1], "text", key[3], key[4]), {}).get("mlx-vlm")
            if text is not None:
                pair["mlx-vlm"] = text  # mlx-vlm loads all towers in every mode
        for impl in ("ours", "mlx-vlm"):
            r = pair.get(impl)
            if r is None:
                continue
            if not r.get("ok") and r.get("peak_rss_mib") is None:
                lines.append(f"{key[0]:<5} {_label(r):<30} {impl:<8} FAILED: {str(r.get('error'))[:160]}")
                continue
            if not r.get("ok"):
                note = f"PARTIAL ({str(r.get('error'))[:60]}) "
            else:
                note = ""
            peak = r["peak_rss_mib"] * MiB / GB
            base = (r.get("after_import_hwm_mib") or 0) * MiB / GB
            target = RSS_TARGETS.get(key[0])
            if impl == "ours" and r["variant"] == "4bit" and r["mode"] == "text" and target and r["prompt"] >= 1920:
                note += f"target <= {target / GB:.1f} GB: {'MET' if peak * GB <= target else 'MISSED'}"
            lines.append(
                f"{key[0]:<5} {_label(r):<30} {impl:<8} {r.get('ready_s', 0):>7.2f} {r.get('ttft_s', 0):>7.1f} "
                f"{r.get('prefill_tok_s', 0):>8.1f} {r.get('decode_tok_s', 0):>8.2f} {peak:>10.2f} {peak - base:>9.2f} "
                f"{r['mlx_peak_mib'] * MiB / GB:>10.2f} "
                f"{(r.get('end_rss_anon_mib') or 0) * MiB / GB:>6.2f}/{(r.get('end_rss_file_mib') or 0) * MiB / GB:<6.2f}  {note}"
            )
        o, v = pair.get("ours"), pair.get("mlx-vlm")
        if o and v and not (o.get("ok") and v.get("ok")):
            lines.append(f"{'':<5} {'':<30} {'ratio':<8} none: a run did not finish")
        elif o and v and o.get("peak_rss_mib") and v.get("peak_rss_mib") and o.get("ready_s") and v.get("ready_s"):
            rss = o["peak_rss_mib"] / v["peak_rss_mib"]
            mlx = o["mlx_peak_mib"] / v["mlx_peak_mib"] if v["mlx_peak_mib"] else float("nan")
            load = o["ready_s"] / v["ready_s"] if v["ready_s"] else float("nan")
            ttft = o["ttft_s"] / v["ttft_s"] if v.get("ttft_s") and o.get("ttft_s") else float("nan")
            lines.append(
                f"{'':<5} {'':<30} {'ratio':<8} ours/mlx-vlm: peak RSS {rss:.2f} (target <= 0.5: "
                f"{'MET' if rss <= 0.5 else 'MISSED'}), MLX peak {mlx:.2f}, load {load:.2f} "
                f"(= {1 / load:.1f}x faster; target >= 3x: {'MET' if load <= 1 / 3 else 'MISSED'}), TTFT {ttft:.2f}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default E2B and E4B")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("BENCH_CACHE", "/work/bench-cache")),
                   help="where checkpoints are built and converted (outside git)")
    p.add_argument("--impls", default="ours,mlx-vlm")
    p.add_argument("--variants", default="4bit,bf16")
    p.add_argument("--modes", default="text,towers",
                   help="of text, towers (all towers loaded, text run), audio, vision (towers run)")
    p.add_argument("--bf16-modes", default="text", help="modes for the bf16 variant")
    p.add_argument("--prompt", type=int, default=SPEC_PROMPT)
    p.add_argument("--gen", type=int, default=SPEC_GEN)
    p.add_argument("--bf16-gen", type=int, default=None, help="generated tokens for the bf16 runs (default --gen)")
    p.add_argument("--ctx-prompt", type=int, default=1920, help="2K-context point (0: skip)")
    p.add_argument("--ctx-gen", type=int, default=128)
    p.add_argument("--prefill-step", type=int, default=PREFILL_CHUNK, help="both implementations (our default)")
    p.add_argument("--encode-only", action="store_true",
                   help="audio/vision: run the tower on a full-size input, then generate from a text-only prompt")
    p.add_argument("--float32-text", action="store_true",
                   help="both: run the decoder in float32 (MLX-CPU's bfloat16 quantized matmul is ~8x slower)")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--timeout", type=float, default=1800, help="per subprocess, seconds")
    p.add_argument("--openblas", choices=("auto", "on", "off"), default="off",
                   help=f"LD_PRELOAD {OPENBLAS} into the workers (auto: if present)")
    p.add_argument("--no-warm-cache", dest="warm_cache", action="store_false",
                   help="do not read each checkpoint into the page cache before its run")
    p.add_argument("--results", type=Path, default=None, help="JSON output (default bench/.cache/memory-<time>.json)")
    args = p.parse_args(argv)
    args.shape = args.shape or ["E2B", "E4B"]
    args.impls = [s for s in args.impls.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    args.bf16_modes = [s for s in args.bf16_modes.split(",") if s]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.results = args.results or HERE / ".cache" / f"memory-{stamp}.json"
    logs = HERE / ".cache" / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    openblas = args.openblas == "on" or (args.openblas == "auto" and Path(OPENBLAS).is_file())
    if openblas:
        env["LD_PRELOAD"] = OPENBLAS
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    report = {"started": stamp, "argv": sys.argv, "machine": machine_info(openblas), "shapes": {}, "runs": []}
    m = report["machine"]
    print(f"# mlx-gemma3n memory benchmark ({stamp})\n# backend: {m['backend']}, mlx {m['versions']['mlx']}, "
          f"mlx-vlm {m['versions']['mlx-vlm']}, mlx-lm {m['versions']['mlx-lm']}\n# machine: {m['cpu']}, "
          f"{m['cores']} cores, {(m['ram_bytes'] or 0) / GB:.1f} GB RAM; LD_PRELOAD OpenBLAS: "
          f"{'ON' if openblas else 'off'}\n# dtypes: 4bit = ours 4-bit decoder + 8-bit PLE file + 8-bit audio "
          "tower linears, vision tower bf16; "
          f"mlx-vlm 4-bit via its own converter. bf16 = both read the bf16 HF checkpoint directly.\n"
          f"# decoder activations: {'float32 (--float32-text)' if args.float32_text else 'as stored (bf16)'}\n"
          f"# prompt {args.prompt} + {args.gen} generated (spec 512+128), 2K point {args.ctx_prompt}+{args.ctx_gen}; "
          f"weights random, prompts random ids; per-run timeout {args.timeout:.0f}s\n", flush=True)
    t_all = time.perf_counter()
    for shape in args.shape:
        info = prepare(shape, args.cache_dir, args.impls, args.variants, env, args.timeout, logs)
        report["shapes"][shape] = info
        for run in plan_runs(args):
            model_dir = info["dirs"].get(f"{run['impl']}/{run['variant']}")
            if model_dir is None:
                conv = info["conversions"].get(run["impl"], {})
                report["runs"].append(dict(run, shape=shape, ok=False,
                                           error=f"no checkpoint: conversion failed: {conv.get('error', '?')[-300:]}"))
                continue
            report["runs"].append(measure(shape, run, model_dir, env, args, logs))
            report["elapsed_s"] = time.perf_counter() - t_all
            args.results.write_text(json.dumps(report, indent=2))
    report["elapsed_s"] = time.perf_counter() - t_all
    report["table"] = table(report["runs"])
    args.results.write_text(json.dumps(report, indent=2))
    print("\n" + report["table"])
    for shape, info in report["shapes"].items():
        print(f"\n[{shape}] HF checkpoint {info['hf']['bytes'] / GB:.2f} GB at {info['hf']['path']}")
        for impl, c in info["conversions"].items():
            if "bytes" in c:
                extra = "" if c.get("cached") else f", converted in {c['seconds']:.0f}s, peak RSS {c['peak_rss_bytes'] / GB:.2f} GB"
                print(f"[{shape}] {impl} 4-bit: {c['bytes'] / GB:.2f} GB{extra}")
            else:
                print(f"[{shape}] {impl} 4-bit conversion FAILED: {c.get('error', '')[-300:]}")
    print(f"\ntotal {report['elapsed_s'] / 60:.1f} min; results: {args.results}; logs: {logs}")


if __name__ == "__main__":
    main()
