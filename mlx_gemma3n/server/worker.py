"""The one thread that owns the model: it loads it and runs every generation, one request at
a time, in arrival order (`python -m mlx_gemma3n.server` uses the main thread).

The API itself may be called from any thread (its MLX work runs on the package thread,
mlx_thread.py); one owner thread keeps the conversation caches single-threaded and gives each
request the whole machine in turn. The HTTP side hands it token ids and decoded media (numpy)
and receives plain-Python events. Requests are queued
rather than batched: with MLX-CPU's 4-bit kernels a decode step of 4 sequences costs 4x one
(bench/server_concurrency.py, README "Apps"), and our caches, chunked prefill and
per-layer-table reads are per sequence."""

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from ..api import PromptCache, SamplingOptions, load, stream_generate
from ..processor import PromptInputs
from .conversations import ConversationCaches, MediaKey

log = logging.getLogger("mlx_gemma3n.server")


@dataclass
class Piece:
    """New reply text; `tokens` generated so far, after `cached_tokens` reused prompt tokens."""

    text: str
    tokens: int
    cached_tokens: int


@dataclass
class Done:
    finish_reason: str  # "stop", "length" or "cancelled"
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused


@dataclass
class Failed:
    message: str
    status: int  # 400: the input was at fault; 500: the server; 503: it is shutting down


Event = Union[Piece, Done, Failed]


@dataclass
class Job:
    """One generation. `emit` is called from the worker thread with each event."""

    request_id: str
    inputs: PromptInputs
    media: MediaKey  # see `conversations.media_key`
    max_tokens: int
    sampling: SamplingOptions
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationWorker:
    """Loads `model` and serves `submit`ted jobs one at a time, both in the thread that calls
    `load` and then `serve`. The KV caches of the last `cache_slots` conversations are kept
    (see `conversations`): a request extending one of them prefills only its new tokens."""

    def __init__(self, model: str, text_only: bool = False, cache_slots: int = 4):
        self.model_name, self.text_only, self.cache_slots = model, text_only, cache_slots
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.model = self.processor = self.current = None
        self.caches: Optional[ConversationCaches] = None

    def load(self) -> None:
        self.model, self.processor = load(self.model_name, text_only=self.text_only)
        self.caches = ConversationCaches(lambda: PromptCache.new(self.model), self.cache_slots)

    def submit(self, job: Job) -> None:
        """Queue `job` (from any thread)."""
        self.jobs.put(job)

    def serve(self, keep_going: Callable[[], bool], poll_s: float = 0.5) -> None:
        """Run queued jobs in arrival order while `keep_going()` (checked every `poll_s`)."""
        while keep_going():
            try:
                job = self.jobs.get(timeout=poll_s)
            except queue.Empty:
                continue
            self.current = job
            self._serve(job)
            self.current = None

    def shutdown(self) -> None:
        """Fail the interrupted job and the queued ones, so that their clients get an answer."""
        jobs = [self.current] if self.current else []
        while not self.jobs.empty():
            jobs.append(self.jobs.get_nowait())
        for job in jobs:
            job.cancelled.set()
            job.emit(Failed("the server is shutting down", 503))

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            log.info("%s: cancelled while queued", job.request_id)
            job.emit(Done("cancelled", 0, 0))
            return
        cache = self.caches.take(job.inputs.token_ids, job.media)
        n, cached, finish = 0, 0, "cancelled"
        try:
            for r in stream_generate(
                self.model, self.processor, job.inputs, prompt_cache=cache,
                max_tokens=job.max_tokens, sampling=job.sampling, should_stop=job.cancelled.is_set,
            ):
                n, finish = r.generation_tokens, r.finish_reason
                cached = len(job.inputs.token_ids) - r.prompt_tokens  # r.prompt_tokens: those prefilled
                job.emit(Piece(r.text, n, cached))
        except Exception as e:
            user_error = isinstance(e, ValueError)
            level = logging.INFO if user_error else logging.ERROR
            log.log(level, "%s: failed: %s", job.request_id, e, exc_info=not user_error)
            self.caches.discard(cache)
            job.emit(Failed(str(e), 400 if user_error else 500))
            return
        n_prompt = len(job.inputs.token_ids)
        log.info("%s: %d prompt tokens (%d cached), %d generated, %s", job.request_id, n_prompt, cached, n, finish)
        job.emit(Done(finish, n, cached))
