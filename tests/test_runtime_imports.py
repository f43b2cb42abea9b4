"""torch, transformers and timm are test-only: the runtime never imports them (importing any
`mlx_lm.*` module the usual way would pull in transformers, and with it torch) — also not when
it reads a tokenizer.json and renders the checkpoint's chat template."""

import shutil
import subprocess
import sys

import pytest

SCRIPT = """
import sys
import mlx.core as mx
import mlx_gemma3n
model, processor = mlx_gemma3n.load({path!r})
chat = mlx_gemma3n.ChatSession(model, processor, system="Be brief.")
list(chat.send("hi", {media}max_tokens=2))
chat.prompt_cache.save({cache!r})
heavy = [m for m in ("torch", "transformers", "timm", "mlx_lm") if m in sys.modules]
print("HEAVY", heavy)
print("TEMPLATE", processor.chat_template is not None, "tokenizers" in sys.modules)
"""


@pytest.fixture(params=["tokenizer.model", "tokenizer.json + chat template"])
def checkpoint(request, tiny_hf, tmp_path):
    if request.param == "tokenizer.model":
        return tiny_hf[0], "TEMPLATE False False", True
    from reference import GEMMA3N_TEMPLATE
    from transformers import AutoTokenizer

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_hf[0], path)
    AutoTokenizer.from_pretrained(path).save_pretrained(path)
    (path / "tokenizer.model").unlink()
    (path / "chat_template.jinja").write_text(GEMMA3N_TEMPLATE)
    return path, "TEMPLATE True True", False  # the towers' imports are covered above


def test_runtime_imports_no_torch_transformers_or_mlx_lm_package(checkpoint, tmp_path):
    from pathlib import Path

    path, expected, with_media = checkpoint
    assets = Path(__file__).parents[1] / "examples" / "assets"
    media = f"images=[{str(assets / 'cat.png')!r}], audio=[{str(assets / 'speech.flac')!r}], "
    code = SCRIPT.format(path=str(path), media=media if with_media else "", cache=str(tmp_path / "c.safetensors"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert expected in r.stdout
