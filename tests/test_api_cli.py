"""The app API and the command line on the tiny checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_gemma3n
from mlx_gemma3n import ChatSession, PromptCache, SamplingOptions
from mlx_gemma3n.cli import main as cli_main

ASSETS = Path(__file__).parents[1] / "examples" / "assets"


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    return mlx_gemma3n.load(str(tiny_hf[0]))


def tokens(responses):
    return [r.token for r in responses]


def run_cli(*args, env=None, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_gemma3n.generate", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        input=stdin,
    )


def test_interactive_chat_keeps_the_cache(tiny_hf):
    r = run_cli("--model", str(tiny_hf[0]), "--chat", "--max-tokens", "5", stdin="hello\nand more\n\n")
    assert r.returncode == 0, r.stderr
    prompts = [int(line.split("Prompt: ")[1].split()[0]) for line in r.stderr.splitlines() if "Prompt:" in line]
    # the second turn prefills only its own ~10 tokens, not the whole conversation
    assert len(prompts) == 2 and prompts[1] < prompts[0] + 5


def test_demo_model_runs_text_image_and_audio(tmp_path):
    """README's first command, as written."""
    env = dict(os.environ, MLX_GEMMA3N_CACHE=str(tmp_path))
    args = ["--model", "demo", "--prompt", "Describe the picture and transcribe the audio."]
    r = run_cli(*args, "--image", str(ASSETS / "cat.png"), "--audio", str(ASSETS / "speech.flac"), env=env)
    assert r.returncode == 0, r.stderr
    assert "random-weight" in r.stderr and r.stdout.strip()
    assert (tmp_path / "demo-v3" / "per_layer_embeddings.safetensors").is_file()


def test_cli_end_to_end_with_image_and_audio(tiny_hf):
    r = run_cli(
        "--model", str(tiny_hf[0]),
        "--prompt", "Describe the picture and transcribe the audio.",
        "--image", str(ASSETS / "cat.png"),
        "--audio", str(ASSETS / "speech.flac"),
        "--max-tokens", "12",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    stats = r.stderr.splitlines()[-1]
    assert "Prompt:" in stats and "tokens/s" in stats and "Peak memory" in stats
    # 256 image + 188 audio soft tokens, plus their markers and the text
    assert int(stats.split("Prompt: ")[1].split()[0]) > 256 + 188


def test_streaming_equals_non_streaming(loaded):
    model, processor = loaded
    pieces = list(mlx_gemma3n.stream_generate(model, processor, "hello world", max_tokens=24))
    text = mlx_gemma3n.generate(model, processor, "hello world", max_tokens=24)
    assert "".join(p.text for p in pieces) == text
    assert pieces[-1].finish_reason in ("stop", "length")
    assert pieces[-1].generation_tokens == len(pieces)


def test_seed_makes_sampling_reproducible_and_options_matter(loaded):
    model, processor = loaded

    def sample(**kw):
        return tokens(mlx_gemma3n.stream_generate(model, processor, "the cat", max_tokens=30, sampling=SamplingOptions(**kw)))

    hot = sample(temperature=1.5, seed=1)
    assert hot == sample(temperature=1.5, seed=1)
    assert hot != sample(temperature=1.5, seed=2)
    assert hot != sample(temperature=0.0)
    assert sample(temperature=1.5, top_k=1, seed=3) == sample(temperature=0.0)  # top-1 is greedy
    greedy = sample(temperature=0.0)
    penalised = sample(temperature=0.0, repetition_penalty=5.0)
    assert penalised != greedy
    assert len(set(penalised)) >= len(set(greedy))


def test_cancellation_between_tokens(loaded):
    model, processor = loaded
    seen = []
    for r in mlx_gemma3n.stream_generate(model, processor, "count", max_tokens=50, should_stop=lambda: len(seen) >= 3):
        seen.append(r)
    assert len(seen) == 4 and seen[-1].finish_reason == "cancelled"


def test_saved_prompt_cache_continues_identically(loaded, tmp_path):
    model, processor = loaded
    options = {"max_tokens": 10}
    uninterrupted = ChatSession(model, processor, system="Be brief.")
    first = tokens(uninterrupted.send("hello there", **options))
    second = tokens(uninterrupted.send("and then?", **options))

    resumed = ChatSession(model, processor, system="Be brief.")
    assert tokens(resumed.send("hello there", **options)) == first
    resumed.prompt_cache.save(tmp_path / "chat.safetensors")
    reloaded = PromptCache.load(tmp_path / "chat.safetensors")
    assert reloaded.tokens == resumed.prompt_cache.tokens
    assert tokens(ChatSession(model, processor, prompt_cache=reloaded).send("and then?", **options)) == second


def test_chat_turns_reuse_the_cache(loaded):
    """The second turn prefills only its own tokens, and equals a fresh run over the whole
    conversation's ids."""
    model, processor = loaded
    chat = ChatSession(model, processor)
    tokens(chat.send("first question", max_tokens=6))
    cached = chat.prompt_cache.processed
    second = list(chat.send("second question", max_tokens=6))
    history = chat.prompt_cache.tokens[: -len(second)]
    assert cached > 10 and second[0].prompt_tokens == len(history) - cached
    fresh = PromptCache.new(model)
    from mlx_gemma3n.api import stream_tokens
    from mlx_gemma3n.processor import PromptInputs

    again = tokens(stream_tokens(model, processor, PromptInputs(history), fresh, max_tokens=6))
    assert again == tokens(second)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "model path not found"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--temp", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "2100"], "exceeds the model's context of 2048 tokens"),
        (["--image", str(Path(__file__))], "test_api_cli.py"),
        (["--audio", str(Path(__file__))], "test_api_cli.py"),
        (["--audio", "/nonexistent.wav"], "/nonexistent.wav"),
    ],
)
def test_user_errors_exit_nonzero_without_traceback(tiny_hf, capsys, args, message):
    base = ["--model", str(tiny_hf[0]), "--prompt", "hi"]
    with pytest.raises(SystemExit) as e:
        cli_main(base + args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_prompt_longer_than_context(loaded):
    model, processor = loaded
    with pytest.raises(ValueError, match="exceeds the model's context"):
        list(mlx_gemma3n.stream_generate(model, processor, "the cat " * 1100, max_tokens=1))


def test_empty_token_prompt_is_refused(loaded):
    from mlx_gemma3n.generation import generate_step

    with pytest.raises(ValueError, match="prompt is empty"):
        next(generate_step(loaded[0], mx.array([], dtype=mx.int32)))


def test_subprocess_user_error_has_no_traceback():
    r = run_cli("--model", "/nonexistent/model", "--prompt", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "model path not found" in r.stderr


def test_stream_generate_takes_processed_inputs_and_leaves_them_intact(loaded):
    model, processor = loaded
    inputs = processor("hello world")
    ids = list(inputs.token_ids)
    assert tokens(mlx_gemma3n.stream_generate(model, processor, inputs, max_tokens=8)) == tokens(
        mlx_gemma3n.stream_generate(model, processor, "hello world", max_tokens=8)
    )
    # a cache holding exactly the prompt is reset (nothing would be left to prefill), not reused
    cache = PromptCache.new(model)
    list(mlx_gemma3n.stream_generate(model, processor, inputs, prompt_cache=cache, max_tokens=1))
    cache.tokens = cache.tokens[: len(ids)]
    again = tokens(mlx_gemma3n.stream_generate(model, processor, inputs, prompt_cache=cache, max_tokens=8))
    assert again == tokens(mlx_gemma3n.stream_generate(model, processor, inputs, max_tokens=8))
    assert inputs.token_ids == ids


def test_text_only_model_never_samples_a_tower_token(tiny_hf):
    """Loaded text-only, the towers' hard tokens cannot be embedded: sampling one would fail
    the next step mid-reply, so they are masked even when a processor pushes them up."""
    from mlx_gemma3n.generation import generate_step

    prompt = mx.array([2, 10, 20])

    def run(model):
        audio = model.config.audio_config["vocab_offset"]
        push = lambda history, logits: logits + 1e4 * (mx.arange(logits.shape[-1]) == audio)
        return audio, [t for t, _ in generate_step(model, prompt, logits_processors=[push], max_tokens=3)]

    audio, full = run(mlx_gemma3n.load(str(tiny_hf[0]))[0])
    assert full[0] == audio  # the push works where the embedder can be loaded
    audio, text_only = run(mlx_gemma3n.load(str(tiny_hf[0]), text_only=True)[0])
    assert len(text_only) == 3 and audio not in text_only
