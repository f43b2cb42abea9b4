"""The Python API for apps: load, generate, stream_generate, chat sessions, prompt caches."""

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .checks import is_finite_number, is_int
from .file_tensors import read_header
from .generation import PREFILL_CHUNK, generate_step
from .kernels import set_kernels
from .loading import load_model, resolve_model_path
from .mlx_lm_parts import cache as mlx_lm_cache
from .mlx_lm_parts import sample_utils
from .mlx_thread import mlx_thread, on_mlx_thread, shared_stream
from .model import Gemma3n
from .processor import Processor, Prompt, PromptInputs, user_message


def load(
    path_or_hub_id: str, text_only: bool = False, kernels: bool = True
) -> Tuple[Gemma3n, Processor]:
    """Load a Gemma 3n checkpoint (local directory or Hub id, HF or MLX-converted).

    Returns (model, processor). The audio and vision towers load on first use; with
    `text_only=True` they never do. "demo" is a tiny random-weight model built locally.
    `kernels=False` decodes through the pure-MLX reference ops instead of the fused Metal/CUDA
    kernels (as does the environment variable `MLX_GEMMA3N_KERNELS=0`).

    May be called from any thread, and the model used from any other: the MLX work runs on
    the package's MLX thread (see `mlx_thread`)."""
    if path_or_hub_id == "demo":
        from .demo import demo_checkpoint

        path = on_mlx_thread(demo_checkpoint)
    else:
        path = resolve_model_path(path_or_hub_id)
    model = on_mlx_thread(lambda: load_model(path, lazy=not text_only))
    set_kernels(model, kernels)
    return model, Processor.from_pretrained(path, model.config)


@dataclass
class SamplingOptions:
    """How the next token is chosen. temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    seed: Optional[int] = None

    def validate(self) -> None:
        """Raise ValueError naming the first option that is not a finite number in range."""
        checks = [
            ("temperature", lambda v: v >= 0, ">= 0"),
            ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("top_k", lambda v: v >= 0 and v == int(v), "an integer >= 0 (0 disables it)"),
            ("min_p", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("repetition_penalty", lambda v: v > 0, "> 0"),
            ("repetition_context_size", lambda v: v > 0 and v == int(v), "an integer > 0"),
        ]
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not (is_finite_number(value) and ok(value)):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        seed = self.seed
        if seed is not None and not (is_int(seed) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")

    def sampler(self):
        """A new sampler. Its draws depend on `seed` alone (a fresh random seed if None), not on
        the thread nor on other generations sampling in between: each step seeds MLX's
        (thread-local) generator from a sequence of its own."""
        sample = sample_utils.make_sampler(self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)
        if self.temperature == 0:
            return sample
        seeds = np.random.default_rng(self.seed)

        def seeded(logprobs: mx.array) -> mx.array:
            mx.random.seed(int(seeds.integers(2**63)))
            return sample(logprobs)

        return seeded

    def logits_processors(self):
        if self.repetition_penalty == 1.0:
            return []
        return sample_utils.make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )


@dataclass
class GenerationResponse:
    """One streamed step: the new text piece and token, with running statistics."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None  # "stop", "length" or "cancelled" on the last step


@dataclass
class PromptCache:
    """The KV caches of a conversation and the token ids they stand for. `tokens` may run a
    few ids ahead of what the caches hold; those are fed first on the next request."""

    cache: List
    tokens: List[int] = field(default_factory=list)

    @classmethod
    def new(cls, model: Gemma3n) -> "PromptCache":
        return cls(model.make_cache())

    @property
    def processed(self) -> int:
        return self.cache[0].offset

    def save(self, file) -> None:
        """Save to a .safetensors file (mlx-lm's prompt-cache format plus our token ids)."""
        mlx_lm_cache.save_prompt_cache(str(file), self.cache, {"tokens": ",".join(map(str, self.tokens))})

    @classmethod
    def load(cls, file) -> "PromptCache":
        if not Path(file).is_file():
            raise FileNotFoundError(f"prompt cache file not found: {file}")
        read_header(Path(file))  # raises ValueError unless its tensors tile the data exactly
        with mx.stream(shared_stream()):  # so that any thread may evaluate it
            cache, meta = mlx_lm_cache.load_prompt_cache(str(file), return_metadata=True)
        tokens = [int(t) for t in meta.get("tokens", "").split(",") if t]
        return cls(cache, tokens)


def _check_length(model: Gemma3n, n_tokens: int, max_tokens: int) -> None:
    limit = model.config.text_config.max_position_embeddings
    if n_tokens + max_tokens > limit:
        raise ValueError(
            f"prompt of {n_tokens} tokens plus max_tokens={max_tokens} exceeds the model's "
            f"context of {limit} tokens"
        )


def _multimodal_features(model: Gemma3n, processor: Processor, inputs: PromptInputs):
    image = audio = None
    if inputs.images:
        image = model.encode_images(mx.array(inputs.pixel_values()))
    if inputs.audio:
        features, valid = processor.audio_features(inputs.audio)
        audio = model.encode_audio(mx.array(features), mx.array(valid))
    return image, audio


def stream_tokens(
    model: Gemma3n,
    processor: Processor,
    inputs: PromptInputs,
    prompt_cache: PromptCache,
    *,
    max_tokens: int = 256,
    sampling: Optional[SamplingOptions] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    prefill_step_size: int = PREFILL_CHUNK,
) -> Iterator[GenerationResponse]:
    """Generate after `inputs`, whose ids continue `prompt_cache.tokens`. The lower-level
    entry point shared by `stream_generate` and `ChatSession`.

    Callable from any thread, by several at once: each step runs on the package's MLX thread
    (see `mlx_thread`), where `should_stop` is called too."""
    steps = _stream_tokens(model, processor, inputs, prompt_cache, max_tokens, sampling, should_stop, prefill_step_size)
    return mlx_thread().iterate(steps)


def _stream_tokens(model, processor, inputs, prompt_cache, max_tokens, sampling, should_stop, prefill_step_size):
    sampling = sampling or SamplingOptions()
    sampling.validate()
    if not (is_int(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    all_tokens = prompt_cache.tokens + inputs.token_ids
    _check_length(model, len(all_tokens), max_tokens)

    tic = time.perf_counter()
    image, audio = _multimodal_features(model, processor, inputs)
    new = all_tokens[prompt_cache.processed :]
    steps = generate_step(
        model,
        mx.array(new),
        prompt_cache.cache,
        image_features=image,
        audio_features=audio,
        sampler=sampling.sampler(),
        logits_processors=sampling.logits_processors(),
        max_tokens=max_tokens,
        prefill_step_size=prefill_step_size,
    )
    prompt_cache.tokens = all_tokens
    detok = processor.tokenizer.detokenizer()
    eos = processor.tokenizer.eos_token_ids
    prompt_tps = gen_start = 0.0
    for n, (token, _) in enumerate(steps, 1):
        if n == 1:
            gen_start = time.perf_counter()
            prompt_tps = len(new) / (gen_start - tic)
        prompt_cache.tokens.append(token)
        finish = "stop" if token in eos else "length" if n == max_tokens else None
        if finish is None and should_stop is not None and should_stop():
            finish = "cancelled"
        elapsed = time.perf_counter() - gen_start
        yield GenerationResponse(
            text="" if token in eos else detok.add(token),
            token=token,
            prompt_tokens=len(new),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
        )
        if finish:
            break


def stream_generate(
    model: Gemma3n,
    processor: Processor,
    prompt: Prompt,
    *,
    prompt_cache: Optional[PromptCache] = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream the model's reply to `prompt` (a string or chat messages, see `processor`, or
    the whole prompt already processed into `PromptInputs`).

    `options`: `max_tokens`, `sampling` (`SamplingOptions`), `should_stop` (checked between
    tokens, for cancellation) and `prefill_step_size`, as for `stream_tokens`. With a
    `prompt_cache` whose tokens begin the new prompt, only the rest is prefilled; otherwise the
    cache is reset."""
    inputs = replace(prompt) if isinstance(prompt, PromptInputs) else processor(prompt)  # a copy: trimmed below
    n_cached = len(prompt_cache.tokens) if prompt_cache is not None else 0
    if prompt_cache is None:
        prompt_cache = PromptCache.new(model)
    elif n_cached < len(inputs.token_ids) and inputs.token_ids[:n_cached] == prompt_cache.tokens:
        inputs.token_ids = inputs.token_ids[n_cached:]
        _drop_cached_media(inputs, processor.config)
    else:
        prompt_cache.cache[:] = model.make_cache()
        prompt_cache.tokens = []
    yield from stream_tokens(model, processor, inputs, prompt_cache, **options)


def _drop_cached_media(inputs: PromptInputs, config) -> None:
    """Images/audio whose placeholders are already in the cache were encoded into it: keep
    only those of the uncached part (placeholders come in order, so they are the last ones)."""
    ids = np.array(inputs.token_ids)
    for kind, token, per_item in (
        ("images", config.image_token_id, config.vision_soft_tokens_per_image),
        ("audio", config.audio_token_id, config.audio_soft_tokens_per_image),
    ):
        items = getattr(inputs, kind)
        remaining = int((ids == token).sum()) // per_item
        setattr(inputs, kind, items[len(items) - remaining :] if remaining else [])


def generate(model: Gemma3n, processor: Processor, prompt: Prompt, *, verbose: bool = False, **options) -> str:
    """The whole reply to `prompt` as a string (also streamed to stdout with `verbose`);
    options as for `stream_generate`."""
    pieces = []
    for r in stream_generate(model, processor, prompt, **options):
        pieces.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
    return "".join(pieces)


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns: each turn prefills
    only its own tokens. The generated ids (not a re-tokenization of the text) stay in the
    history, so the cache always matches what the model saw."""

    def __init__(
        self,
        model: Gemma3n,
        processor: Processor,
        system: Optional[str] = None,
        prompt_cache: Optional[PromptCache] = None,
    ):
        self.model, self.processor = model, processor
        self.system = system
        self.prompt_cache = prompt_cache or PromptCache.new(model)

    def send(self, text: str, images=(), audio=(), **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to one user turn; kwargs as for `stream_tokens`."""
        message = user_message(text, images, audio)
        first = not self.prompt_cache.tokens
        messages = [message]
        if first and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        inputs = self.processor(messages, add_bos=first)
        if not first:
            inputs.token_ids = self.processor.tokenizer.encode(self._closing()) + inputs.token_ids
        yield from stream_tokens(self.model, self.processor, inputs, self.prompt_cache, **kwargs)

    def _closing(self) -> str:
        """What closes the model's last turn, less what its final token already wrote (it
        may have ended on "<end_of_turn>")."""
        closing = self.processor.model_turn_end()
        tokenizer = self.processor.tokenizer
        if self.prompt_cache.tokens[-1] in tokenizer.eos_token_ids:
            for end in filter(None, (tokenizer.decode([i]) for i in tokenizer.eos_token_ids)):
                closing = closing.removeprefix(end)
        return closing
