"""bench/device_run.py's first device call runs before MLX is installed there: building the
benchmark checkpoints must not import MLX, or a lent GPU session loses its head start."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_checkpoints_build_without_mlx(tmp_path):
    blocker = tmp_path / "no_mlx" / "mlx"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('MLX is not installed yet (device call 1)')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent))
    root = tmp_path / "device"
    subprocess.run([sys.executable, str(REPO / "bench" / "device_run.py"), "build", "--root", str(root),
                    "--shapes", "tiny"], env=env, check=True, cwd=str(REPO), capture_output=True)
    hf = root / "ckpt" / "tiny-hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert "model.language_model.embed_tokens.weight" in index["weight_map"]
    assert (hf / "tokenizer.model").stat().st_size > 0
    # the blocker works: the same environment cannot import MLX
    probe = subprocess.run([sys.executable, "-c", "import mlx.core"], env=env, capture_output=True, text=True)
    assert "MLX is not installed yet" in probe.stderr


def test_device_check_runs_the_kernels_and_passes():
    """tests/device_check.py, the first step on a lent GPU, on the CPU Metal executor: the
    kernel path really differs from the reference ops (the kernels ran), within its bound."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "device_check.py"), "--executor", "--tokens", "24"],
                         cwd=str(REPO), capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and report["ok"] and not report["kernel_warnings"]
    float32 = next(c for c in report["checks"] if c["dtype"] == "float32")
    assert 0 < float32["kernels_vs_reference_max_rel"] <= 1e-5
    assert float32["device_vs_cpu_first_token_max_rel"] <= 1e-5
    assert float32["tokens_agree_until"] == 24
