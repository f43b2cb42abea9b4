"""OpenAI chat-completion response objects, and stop sequences applied to streamed text."""

import json
from typing import List, Optional


class StopText:
    """Cuts streamed text at the first stop sequence. Text that might be the start of one is
    held back until the next piece shows whether it is."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def add(self, text: str) -> str:
        """The part of `pending + text` that is certainly before any stop sequence."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        held = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - held
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Reply:
    """The ids and metadata shared by every object of one response."""

    def __init__(self, request_id: str, model: str, created: int):
        self.id, self.model, self.created = request_id, model, created

    def _object(self, kind: str, choice: dict, usage: Optional[dict] = None) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        out["choices"] = [choice] if choice else []
        if usage is not None:
            out["usage"] = usage
        return out

    def completion(self, text: str, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._object("chat.completion", _choice(message=message, finish_reason=finish_reason), usage)

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return self._object("chat.completion.chunk", _choice(delta=delta, finish_reason=finish_reason))

    def usage_chunk(self, usage: dict) -> dict:
        return self._object("chat.completion.chunk", {}, usage)


def _choice(**fields) -> dict:
    return {"index": 0, **fields, "logprobs": None}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
