"""Generation from any thread, and a clean exit (issue 12, section 3).

Each pattern of `thread_patterns.py` runs in a fresh process: text, seeded sampling, an image
and an audio clip (each tower first used where the pattern says), four tokens each. Every
threaded pattern must give exactly the main-thread run's tokens and exit with status 0. Before
the fix each pattern failed ("There is no Stream(cpu, 0) in current thread") and ~90% of the
processes that had run MLX in a worker aborted at exit (status 134); REPEATS runs of each
pattern would miss that with probability ~0.1**(3 * REPEATS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_gemma3n

SCRIPT = Path(__file__).with_name("thread_patterns.py")
REPEATS = 3


@pytest.fixture(scope="module")
def checkpoint(tiny_hf, tmp_path_factory):
    """The tiny checkpoint with 128x128 images: the vision tower's cost falls ~36x and it still
    yields 256 soft tokens (the multi-scale fusion resamples to 16x16)."""
    out = tmp_path_factory.mktemp("threads")
    for file in Path(tiny_hf[0]).iterdir():
        if file.name != "preprocessor_config.json":  # written below, never through a link
            (out / file.name).symlink_to(file)
    (out / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 128, "width": 128}}))
    return out


def run(pattern: str, checkpoint: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(mlx_gemma3n.__file__).parents[1]))
    r = subprocess.run(
        [sys.executable, str(SCRIPT), pattern, str(checkpoint)], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, f"{pattern}: exit status {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def reference(checkpoint):
    tokens = run("main", checkpoint)
    assert all(len(t) == 4 for t in tokens.values())
    return tokens


@pytest.mark.parametrize("repeat", range(REPEATS))
@pytest.mark.parametrize("pattern", ["load_in_thread", "warmup", "concurrent"])
def test_threaded_generation_matches_main_thread_and_exits_cleanly(checkpoint, reference, pattern, repeat):
    assert run(pattern, checkpoint) == reference
