"""torch, transformers and timm are test-only: the runtime never imports them (importing any
`mlx_lm.*` module the usual way would pull in transformers, and with it torch)."""

import subprocess
import sys

SCRIPT = """
import sys
import mlx.core as mx
import mlx_gemma3n
model, processor = mlx_gemma3n.load({path!r})
chat = mlx_gemma3n.ChatSession(model, processor)
list(chat.send("hi", images=[{image!r}], audio=[{audio!r}], max_tokens=2))
chat.prompt_cache.save({cache!r})
heavy = [m for m in ("torch", "transformers", "timm", "mlx_lm") if m in sys.modules]
print("HEAVY", heavy)
"""


def test_runtime_imports_no_torch_transformers_or_mlx_lm_package(tiny_hf, tmp_path):
    from pathlib import Path

    assets = Path(__file__).parents[1] / "examples" / "assets"
    code = SCRIPT.format(
        path=str(tiny_hf[0]),
        image=str(assets / "cat.png"),
        audio=str(assets / "speech.flac"),
        cache=str(tmp_path / "c.safetensors"),
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
