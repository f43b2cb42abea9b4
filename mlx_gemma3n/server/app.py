"""The HTTP side: routes, authentication, request bodies, and the bridge to the generation
worker. Nothing here touches MLX: requests are validated and their media decoded in a thread
pool (numpy/PIL), then queued to the worker as token ids."""

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Tuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..audio.io import AudioError
from ..vision.processor import ImageError
from .conversations import media_key
from .errors import APIError, bad_request, invalid, model_not_found
from .request import ChatRequest, MediaPolicy, parse_chat_request
from .responses import Reply, StopText, sse, usage
from .worker import Done, Failed, GenerationWorker, Job, Piece

log = logging.getLogger("mlx_gemma3n.server")


@dataclass
class ServerConfig:
    model_name: str
    api_key: Optional[str] = None
    media: MediaPolicy = None
    default_max_tokens: int = 512


def create_app(worker: GenerationWorker, config: ServerConfig) -> Starlette:
    """The ASGI app serving `worker`'s model (already loaded) under `config.model_name`."""
    server = _Server(worker, config)
    routes = [
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/models/{model_id:path}", server.model),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


class _Server:
    def __init__(self, worker: GenerationWorker, config: ServerConfig):
        self.worker, self.config = worker, config
        self.media = config.media or MediaPolicy()
        self.created = int(time.time())

    # -- routes -----------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        self._authorize(request)
        name = request.path_params["model_id"]
        if name != self.config.model_name:
            raise model_not_found(name, self.config.model_name)
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request):
        self._authorize(request)
        body = await _read_json(request, self.media.max_bytes)
        chat, job = await run_in_threadpool(self._prepare, body)
        events = self._submit(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))

        def close() -> None:  # a no-op on a finished job; otherwise the client is gone
            watcher.cancel()
            job.cancelled.set()

        try:
            first = await events.get()
            if isinstance(first, Failed):
                raise APIError(first.status, first.message)
        except BaseException:
            close()
            raise
        reply = Reply(job.request_id, self.config.model_name, int(time.time()))
        steps = _steps(first, events, job, StopText(chat.stop), len(job.inputs.token_ids))
        if chat.stream:
            return StreamingResponse(_sse(reply, steps, chat.include_usage, close), media_type="text/event-stream")
        try:
            text, finish, used = await _collect(steps)
        finally:
            close()
        return JSONResponse(reply.completion(text, finish, used))

    # -- helpers ----------------------------------------------------------------------------

    def _model_card(self) -> dict:
        name = self.config.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "mlx-gemma3n"}

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            message = "invalid or missing API key: send 'Authorization: Bearer <key>'"
            raise APIError(401, message, code="invalid_api_key")

    def _prepare(self, body) -> Tuple[ChatRequest, Job]:
        """Validate, decode media and tokenize (in a pool thread: numpy and PIL only)."""
        chat = parse_chat_request(body, self.config.model_name, self.media)
        try:
            inputs = self.worker.processor(chat.messages)
        except (ImageError, AudioError) as e:
            raise bad_request(str(e)) from None
        except ValueError as e:  # roles out of order, and the like
            raise invalid(str(e)) from None
        max_tokens = self._budget(len(inputs.token_ids), chat.max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        return chat, Job(request_id, inputs, media_key(inputs), max_tokens, chat.sampling, emit=None)

    def _budget(self, n_prompt: int, requested: Optional[int]) -> int:
        context = self.worker.processor.config.text_config.max_position_embeddings
        max_tokens = requested or min(self.config.default_max_tokens, context - n_prompt)
        if max_tokens < 1 or n_prompt + max_tokens > context:
            raise bad_request(
                f"the prompt of {n_prompt} tokens plus max_tokens={max_tokens} exceeds the model's "
                f"context of {context} tokens",
                "messages",
                "context_length_exceeded",
            )
        return max_tokens

    def _submit(self, job: Job) -> asyncio.Queue:
        """Queue `job` to the worker; its events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue" = asyncio.Queue()

        def emit(event) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                job.cancelled.set()

        job.emit = emit
        self.worker.submit(job)
        return events


async def _read_json(request: Request, limit: int):
    too_large = APIError(413, f"request body larger than the server's limit of {limit} bytes (--max-request-mb)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"malformed JSON body: {e}") from None


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Stop `job` when the client goes away (the body is read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


async def _steps(event, events: asyncio.Queue, job: Job, stop: StopText, n_prompt: int) -> AsyncIterator:
    """Reply text pieces, then a final (finish_reason, usage) tuple; an APIError if the
    generation fails part-way."""
    while True:
        if isinstance(event, Failed):
            raise APIError(event.status, event.message)
        if isinstance(event, Piece):
            text = stop.add(event.text)
            if text:
                yield text
            if stop.stopped:
                job.cancelled.set()
                yield "stop", usage(n_prompt, event.tokens, event.cached_tokens)
                return
        if isinstance(event, Done):
            tail = stop.flush()
            if tail:
                yield tail
            yield event.finish_reason, usage(n_prompt, event.completion_tokens, event.cached_tokens)
            return
        event = await events.get()


async def _collect(steps: AsyncIterator) -> Tuple[str, str, dict]:
    pieces = []
    async for step in steps:
        if isinstance(step, str):
            pieces.append(step)
        else:
            finish, used = step
    return "".join(pieces), finish, used


async def _sse(reply: Reply, steps: AsyncIterator, include_usage: bool, close: Callable[[], None]):
    try:
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
        async for step in steps:
            if isinstance(step, str):
                yield sse(reply.chunk({"content": step}))
            else:
                finish, used = step
                yield sse(reply.chunk({}, finish))
                if include_usage:
                    yield sse(reply.usage_chunk(used))
        yield sse("[DONE]")
    except APIError as e:  # headers are sent: the error goes in the stream, as OpenAI does
        yield sse(e.body())
        yield sse("[DONE]")
    finally:
        close()
