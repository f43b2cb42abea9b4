"""Load time, ours vs mlx-vlm, on the same converted checkpoints, cold and warm page cache.

Each measurement is a fresh process that imports the package, loads the model and then
evaluates every weight it holds (what the first forward pass would otherwise read). Reported
(medians): import time, the time until the loader returns, the time until the weights are
resident ("ready", from the load call), and the bytes read (`rchar` of /proc/self/io).
"cold" first drops the checkpoint files from the OS page cache (posix_fadvise DONTNEED), as
after a reboot; "warm" reads them through once before.

    python bench/load_speed.py --pair /work/bench-cache/E4B-ours-4bit /work/bench-cache/E4B-mlxvlm-4bit
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# (import, load) per implementation; mlx_vlm.load() evaluates the weights before returning,
# so its "loader returns" time is our "ready" point.
CHILD = {
    "ours": ("from mlx_gemma3n.loading import load_model", "model = load_model(Path(PATH))"),
    "mlx-vlm": ("from mlx_vlm.utils import load_model", "model = load_model(Path(PATH), lazy=True)"),
}

TIMED = """
import json, time
from pathlib import Path
t0 = time.perf_counter()
import mlx.core as mx
{imports}
t1 = time.perf_counter()
PATH = {path!r}
{load}
t2 = time.perf_counter()
mx.eval(model.parameters())
t3 = time.perf_counter()
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "ready_s": t3 - t1, "read_gb": int(io["rchar"]) / 1e9}}))
"""


def drop_from_page_cache(path: Path) -> None:
    for f in path.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def measure(impl: str, path: Path, cache: str) -> dict:
    (drop_from_page_cache if cache == "cold" else read_through)(path)
    imports, load = CHILD[impl]
    code = TIMED.format(path=str(path), imports=imports, load=load)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", nargs=2, type=Path, action="append", required=True, metavar=("OURS", "MLX_VLM"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    report = []
    for ours, theirs in args.pair:
        for cache in ("cold", "warm"):
            runs = {"ours": [], "mlx-vlm": []}
            for _ in range(args.repeat):  # interleaved, so drifts hit both alike
                runs["ours"].append(measure("ours", ours, cache))
                runs["mlx-vlm"].append(measure("mlx-vlm", theirs, cache))
            med = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for impl, rs in runs.items()}
            row = {"checkpoint": ours.name, "cache": cache, "repeat": args.repeat, **{
                f"{impl}_{k}": round(v, 3) for impl, m in med.items() for k, v in m.items()}}
            # mlx_vlm.load() returns once its weights are resident; ours before reading them
            row["load_ratio"] = round(med["mlx-vlm"]["ready_s"] / med["ours"]["load_s"], 1)
            row["ready_ratio"] = round(med["mlx-vlm"]["ready_s"] / med["ours"]["ready_s"], 2)
            print(json.dumps(row), flush=True)
            report.append(row)
    return report


if __name__ == "__main__":
    main()
