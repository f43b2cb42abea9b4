"""Issue #11's accelerator numbers in one lent-GPU session (15 minutes of device time, start-up
included), prepared here so that nothing is worked out on the device.

First, while the checkpoints build and are converted (a shape's three converters in
parallel, every conversion before the first timed run), `tests/device_check.py`: the fused
kernels and the decode steps built ahead against the reference path on the device (tiny demo
model). Then, in this order (most wanted first; whatever the time allows): decode and
prefill tok/s and MLX peak memory at 512 + 128 and 1920 + 128 tokens for E2B and E4B (4-bit),
ours and mlx-vlm, each run a fresh `bench/worker.py --warmup` process (so kernels are
compiled before the timed run; ours then times its prefill again under other queueing
settings, PREFILL_VARIANTS, and once layer by layer); each prefill op's time and extra memory
(`bench/peak_probe.py`); ours before issue #11 (commit 5557004, with its own converter) at
the same four points; and the host time per decode step (`bench/host_time.py`).

Here, where the package registries are reachable (runs ../shared/device/prepare.sh and
exports the "before" tree):

    python bench/device_run.py prepare

Then three `run` calls of the device tool, back to back (the machine goes back after 30 s idle):

    1. carry [".device/part1"]:  python3 bench/device_run.py start-build
       (copies part1 to $HOME/device, starts building the E2B/E4B checkpoints: no MLX needed)
    2. carry [".device/part2", ".device/before"], timeout_s 600:
       bash $HOME/device/install.sh && python3 bench/device_run.py start-measure && \\
       python3 bench/device_run.py collect --wait 480
    3. while device time is left:  python3 bench/device_run.py collect --wait SECONDS

`collect` copies what is done so far to $OUT (results.jsonl: one JSON object per step, the
two progress logs, logs.tgz: every step's output; four files, as the tool returns at most 8)
and prints a summary. A dry run of the same sequence on this machine with the tiny model:

    python bench/device_run.py dry-run
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEVICE = REPO / ".device"
BEFORE_COMMIT = "5557004"  # main before issue #11's changes (its checkpoints differ: own converter)
POINTS = ((512, "E2B"), (1920, "E4B"), (512, "E4B"), (1920, "E2B"))
GEN = 128
IMPLS = ("ours", "mlx-vlm", "before")
# Ours' prefill again in the same warm process under other queueing settings (unit:depth[:chunk],
# `bench/worker.py --prefill-variants`; the first is today's default), to choose between them.
# layer:1:128 is the least a prefill can keep resident: E4B's 4-bit weights alone (2.52 GB)
# leave 0.28 GB of section 3's 2.8 GB for the caches and a chunk's activations.
PREFILL_VARIANTS = "layer:2,layer:1,layer:4,chunk:1,chunk:2,layer:2:512,layer:1:128"
CHECKPOINT = {"ours": "ours", "mlx-vlm": "mlxvlm", "before": "before"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _spawn(args: list, log: Path) -> None:
    """Start `bench/device_run.py args` detached (own session), so it outlives the tool's call."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, cwd=str(REPO), start_new_session=True)


# -- here -----------------------------------------------------------------------------------


def prepare(args) -> None:
    subprocess.run(["bash", str(REPO.parent / "shared" / "device" / "prepare.sh")], check=True, cwd=str(REPO))
    before = DEVICE / "before"
    shutil.rmtree(before, ignore_errors=True)
    before.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", BEFORE_COMMIT, "mlx_gemma3n", "convert"], cwd=str(REPO),
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(REPO), capture_output=True,
                          text=True).stdout.strip()
    (DEVICE / "part2" / "main_head").write_text(head + "\n")  # the device gets the tree, not .git
    sizes = subprocess.run(["du", "-sh", *(str(DEVICE / d) for d in ("part1", "part2", "before"))],
                           capture_output=True, text=True).stdout
    print(sizes + __doc__[__doc__.index("Then three"):__doc__.index("`collect` copies")])


# -- device: checkpoints --------------------------------------------------------------------


def start_build(args) -> None:
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    part1 = DEVICE / "part1"
    if part1.is_dir():
        for f in part1.iterdir():
            shutil.copy2(f, root / f.name)
    _spawn(["build", "--root", str(root), "--shapes", *args.shapes], root / "build.log")
    _log(f"building {', '.join(args.shapes)} under {root / 'ckpt'} (log: {root / 'build.log'})")


def build(args) -> None:
    """Every shape's random HF checkpoint at once (one process each; make_checkpoint is atomic)."""
    ckpt = args.root / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    procs = {shape: subprocess.Popen([sys.executable, str(HERE / "make_checkpoint.py"), "--shape", shape,
                                      "--out", str(ckpt / f"{shape}-hf")], cwd=str(REPO))
             for shape in args.shapes}
    failed = [shape for shape, proc in procs.items() if proc.wait() != 0]
    for shape in failed:  # measure stops waiting for it
        (ckpt / f"{shape}-hf.failed").touch()
    _log(f"built: {', '.join(sorted(set(procs) - set(failed))) or 'none'}; failed: {', '.join(failed) or 'none'}")
    if failed:
        raise SystemExit(1)


# -- device: measurements -------------------------------------------------------------------


class Session:
    """The ordered steps, each in a child process with what is left of the budget as timeout;
    one JSON line per step in results.jsonl."""

    def __init__(self, args):
        self.args, self.root = args, args.root
        self.ckpt, self.out = args.root / "ckpt", args.root / "results"
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.failed = set()
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, entry: dict) -> None:
        entry["at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self.lock, open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def child(self, name: str, cmd: list, env=None, cwd=REPO, cap: float = 600) -> dict:
        """Run one step; {"step", "returncode", "seconds", "timed_out"} (returncode None if skipped)."""
        entry = {"step": name}
        timeout = min(cap, self.left())
        if timeout < 20:
            entry.update(returncode=None, skipped="device time budget spent")
            return entry
        _log(f"{name} (timeout {timeout:.0f}s)")
        t = time.monotonic()
        with open(self.logs / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                    cwd=str(cwd), timeout=timeout).returncode
                timed_out = False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
        entry.update(returncode=rc, seconds=round(time.monotonic() - t, 1), timed_out=timed_out)
        _log(f"{name}: {'timed out' if timed_out else f'exit {rc}'} after {entry['seconds']}s")
        return entry

    def env(self, impl: str) -> dict:
        tree = self.root / "before" if impl == "before" else REPO
        return dict(os.environ, PYTHONPATH=str(tree), BENCH_CACHE=str(self.ckpt))

    def wait_for(self, shape: str) -> bool:
        hf = self.ckpt / f"{shape}-hf"
        while not (hf / "model.safetensors.index.json").is_file():
            if self.left() < 60 or hf.with_name(f"{hf.name}.failed").exists():
                return False
            time.sleep(5)
        return True

    def converted(self, shape: str, impl: str) -> Path:
        return self.ckpt / f"{shape}-{CHECKPOINT[impl]}-4bit"

    def convert(self, shape: str, impl: str) -> None:
        out = self.converted(shape, impl)
        if (out / "config.json").is_file():
            return
        if not self.wait_for(shape):
            self.failed.add((shape, impl))
            self.record({"step": f"convert-{shape}-{impl}", "returncode": None,
                         "skipped": "no HF checkpoint (build.log says why)"})
            return
        hf = self.ckpt / f"{shape}-hf"
        if impl == "mlx-vlm":
            cmd, cwd = [sys.executable, str(HERE / "vlm_convert.py")], REPO
        else:  # `-m convert` resolves against the working directory first: run in the tree converted with
            cmd, cwd = [sys.executable, "-m", "convert"], self.root / "before" if impl == "before" else REPO
        entry = self.child(f"convert-{shape}-{impl}", cmd + ["--hf-path", str(hf), "--mlx-path", str(out), "-q"],
                           env=self.env(impl), cwd=cwd)
        if entry["returncode"] != 0:
            self.failed.add((shape, impl))
            shutil.rmtree(out, ignore_errors=True)
        self.record(entry)

    def generate(self, shape: str, prompt: int, impl: str) -> None:
        if (shape, impl) in self.failed:
            return
        name = f"run-{shape}-{prompt}+{GEN}-{impl}"
        result = self.logs / f"{name}.json"
        cmd = [sys.executable, str(HERE / "worker.py"), "--impl", "mlx-vlm" if impl == "mlx-vlm" else "ours",
               "--model", str(self.converted(shape, impl)), "--prompt", str(prompt), "--gen", str(GEN),
               "--prefill-step", str(self.args.prefill_step), "--warmup", "--out", str(result)]
        if impl == "ours":
            cmd += ["--prefill-variants", PREFILL_VARIANTS, "--prefill-profile"]
        entry = self.child(name, cmd, env=self.env(impl))
        if result.is_file():
            entry.update(json.loads(result.read_text()))
        entry.update(shape=shape, impl=impl, prompt=prompt, gen=GEN)
        self.record(entry)

    def tool(self, name: str, cmd: list) -> None:
        """A bench script whose stdout is the result (kept whole in the log, its tail recorded)."""
        entry = self.child(name, [sys.executable, *cmd], env=self.env("ours"))
        log = self.logs / f"{name}.log"
        entry["output_tail"] = log.read_text(errors="replace")[-6000:] if log.is_file() else ""
        self.record(entry)

    def drop_hf(self, shape: str) -> None:
        """The HF checkpoint once every conversion of it is done (disk: 64 GB holds ~50 GB of these)."""
        if all((self.converted(shape, impl) / "config.json").is_file() or (shape, impl) in self.failed
               for impl in IMPLS):
            shutil.rmtree(self.ckpt / f"{shape}-hf", ignore_errors=True)


def convert_all(s: Session, shapes: list) -> None:
    """Every conversion before the first timed run, so that none overlaps one: shape by shape
    as its HF checkpoint appears, the three converters of a shape in parallel."""
    for shape in shapes:
        threads = [threading.Thread(target=s.convert, args=(shape, impl)) for impl in IMPLS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s.drop_hf(shape)


def measure(args) -> None:
    s = Session(args)
    try:
        info = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info = None
    head = args.root / "main_head"
    s.record({"step": "device", "gpu": info, "python": sys.version.split()[0], "budget_s": args.budget,
              "shapes": args.shapes, "tree": head.read_text().strip() if head.is_file() else None})
    converting = threading.Thread(target=convert_all, args=(s, args.shapes))
    converting.start()
    s.tool("device_check", [str(REPO / "tests" / "device_check.py")])  # while the checkpoints build
    converting.join()
    # a dry run's one shape takes the two prompt lengths
    points = [(p, shape) for p, shape in POINTS if shape in args.shapes] or [(p, args.shapes[0]) for p in (512, 1920)]
    main_shape, last_shape = args.shapes[0], args.shapes[-1]
    for prompt, shape in points:
        for impl in IMPLS[:2]:
            s.generate(shape, prompt, impl)
    s.tool(f"probe-{last_shape}", [str(HERE / "peak_probe.py"), "--shape", last_shape])
    for prompt, shape in points:
        s.generate(shape, prompt, "before")
    # last: the H100 measured it on 2026-11-26 and an accelerator's decode loop is unchanged since
    s.tool(f"host_time-{main_shape}", [str(HERE / "host_time.py"), "--shape", main_shape, "--as-stored",
                                       "--cache-dir", str(s.ckpt), "--results", str(s.logs / "host_time.json")])
    (s.out / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _log("done")


def start_measure(args) -> None:
    """Copies the "before" tree and main's commit out of the working tree first: a later call
    of the device tool that does not carry them removes them from it, mid-run."""
    (args.root / "results").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.root / "before", ignore_errors=True)
    shutil.copytree(DEVICE / "before", args.root / "before")
    shutil.copy2(DEVICE / "part2" / "main_head", args.root / "main_head")
    _spawn(["measure", "--root", str(args.root), "--shapes", *args.shapes, "--budget", str(args.budget),
            "--prefill-step", str(args.prefill_step)],
           args.root / "results" / "measure.log")
    _log(f"measuring (log: {args.root / 'results' / 'measure.log'})")


# -- device: results ------------------------------------------------------------------------


def collect(args) -> None:
    """Copy the results to $OUT every few seconds (a call cut off by its time limit still
    returns what was copied) until the measuring is done or `--wait` seconds have passed."""
    results = args.root / "results"
    out = Path(args.out or os.environ.get("OUT") or args.root / "collected")
    out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    while True:
        done = (results / "DONE").is_file()
        for f in (results / "results.jsonl", results / "measure.log", args.root / "build.log"):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        if (results / "logs").is_dir():
            subprocess.run(["tar", "-czf", str(out / "logs.tgz"), "-C", str(results), "logs"], check=False)
        if done or time.monotonic() - t >= args.wait:
            break
        time.sleep(min(15, max(args.wait - (time.monotonic() - t), 0)))
    print(summary(results / "results.jsonl"))
    print("finished" if done else "still running: collect again while device time is left")


def _profile_line(profile: dict) -> str:
    """The layer-by-layer prefill (worker --prefill-profile) in one line: per kind of layer the
    median of the per-layer medians, host build and device wait, in ms."""
    kinds = {}
    for layer in profile["layers"][:-1]:  # the last carries the chunk's caches
        kind = ("sparse " if layer["sparse"] else "dense ") + layer["type"].split("_")[0]
        kinds.setdefault(kind, []).append((layer["build_ms"], layer["wait_ms"]))
    parts = [f"{kind} x{len(v)} build {statistics.median(b for b, _ in v):.2f} wait "
             f"{statistics.median(w for _, w in v):.2f}" for kind, v in sorted(kinds.items())]
    return (f"    layer by layer ({profile['chunks']} chunks, {profile['total_s']:.3f}s; ms): " + "; ".join(parts)
            + f"; end {profile['end_ms']:.1f}")


def summary(path: Path) -> str:
    """One line per step: runs with their rates and MLX peak, others with their exit."""
    if not path.is_file():
        return "no results yet"
    lines = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["step"] == "device":
            lines.append(f"device: {e.get('gpu')}, python {e.get('python')}")
        elif "prefill_tok_s" in e:
            lines.append(f"{e['step']:<32} prefill {e['prefill_tok_s']:8.1f} tok/s  decode "
                         f"{e.get('decode_tok_s', float('nan')):6.1f} tok/s  MLX peak "
                         f"{e['mlx_peak_mib'] / 1024:5.2f} GiB  ttft {e['ttft_s']:.2f}s"
                         + (f"  warm-up tokens {e['warmup_token1_s']:.1f}s, {e['warmup_token2_s']:.1f}s"
                            if "warmup_token2_s" in e else "")
                         + (f"  warnings: {'; '.join(e['warnings'])[:300]}" if e.get("warnings") else ""))
            lines += [f"    prefill {v['unit']}:{v['depth']}:{v['chunk']:<4} {v['tok_s']:8.1f} tok/s  "
                      f"MLX peak +{v['peak_over_active_mib']:.0f} MiB over active"
                      for v in e.get("prefill_variants", ())]
            if e.get("prefill_profile"):
                lines.append(_profile_line(e["prefill_profile"]))
            lines += [f"    {name} failed: {e[name + '_error'][:200]}"
                      for name in ("prefill_variants", "prefill_profile") if e.get(name + "_error")]
        else:
            state = e.get("skipped") or ("timed out" if e.get("timed_out") else f"exit {e.get('returncode')}")
            error = f" {e['error'][:200]}" if e.get("error") else ""
            lines.append(f"{e['step']:<32} {state}, {e.get('seconds', 0)}s{error}")
    return "\n".join(lines)


# -- dry run --------------------------------------------------------------------------------


def dry_run(args) -> None:
    """The device sequence on this machine with the tiny model (CPU, float32 preload as usual)."""
    root = args.root
    shutil.rmtree(root, ignore_errors=True)
    if not (DEVICE / "before").is_dir():
        raise SystemExit("no .device/before: run `python bench/device_run.py prepare` first")
    me = [sys.executable, __file__]
    common = ["--root", str(root), "--shapes", "tiny"]
    subprocess.run(me + ["start-build", *common], check=True)
    subprocess.run(me + ["start-measure", *common, "--budget", str(args.budget)], check=True)
    subprocess.run(me + ["collect", "--root", str(root), "--wait", str(args.budget + 60)], check=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {"prepare": prepare, "start-build": start_build, "build": build, "start-measure": start_measure,
                "measure": measure, "collect": collect, "dry-run": dry_run}
    for name in commands:
        c = sub.add_parser(name)
        default_root = Path("/tmp/device-dry-run") if name == "dry-run" else Path.home() / "device"
        c.add_argument("--root", type=Path, default=default_root, help="work folder (checkpoints, results)")
        c.add_argument("--shapes", nargs="+", default=["E2B", "E4B"])
        c.add_argument("--budget", type=float, default=700, help="seconds from the start of measure")
        c.add_argument("--prefill-step", type=int, default=256)
        c.add_argument("--wait", type=float, default=0, help="collect: seconds to wait for the end")
        c.add_argument("--out", type=Path, help="collect: where to copy the results (default $OUT)")
    args = p.parse_args(argv)
    commands[args.command](args)


if __name__ == "__main__":
    main()
