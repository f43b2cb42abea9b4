"""Validation of a `POST /v1/chat/completions` body into what the generation worker needs.

Schema problems (missing or mistyped fields, values out of range, unknown content types) are
422; everything here runs before the request is queued, so the worker only sees valid work."""

import math
from dataclasses import dataclass, field
from typing import List, Optional

from ..api import SamplingOptions
from .errors import bad_request, invalid, model_not_found
from .media import decode_audio, decode_image

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_SEQUENCES = 4


@dataclass
class MediaPolicy:
    """What the server lets a request reference."""

    allow_remote_images: bool = False
    max_bytes: int = 64 << 20


@dataclass
class ChatRequest:
    """A validated chat completion request; `messages` in the `Processor` format."""

    messages: List[dict]
    sampling: SamplingOptions
    max_tokens: Optional[int]  # None: up to the server default, within the context
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_chat_request(body, model_name: str, media: MediaPolicy) -> ChatRequest:
    """Check every field of `body` (the parsed JSON) and decode the media it holds."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise model_not_found(model, model_name)
    _refuse_unsupported(body)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None) or {}
    return ChatRequest(
        messages=parse_messages(body.get("messages"), media),
        sampling=_sampling(body),
        max_tokens=_max_tokens(body),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=stream and _get(options, "include_usage", bool, False, "stream_options.include_usage"),
    )


def parse_messages(messages, media: MediaPolicy) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of message objects", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = _content(message.get("content"), f"{where}.content", role, media)
        out.append({"role": ROLES[role], "content": content})
    return out


def _content(content, where: str, role: str, media: MediaPolicy):
    if isinstance(content, str):
        return _unicode(content, where)
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or an array of content parts", where)
    return [_part(part, f"{where}[{j}]", role, media) for j, part in enumerate(content)]


def _part(part, where: str, role: str, media: MediaPolicy) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = _get(part, "text", str, None, f"{where}.text", required=True)
        return {"type": "text", "text": _unicode(text, f"{where}.text")}
    if role != "user" or kind not in ("image_url", "input_audio"):
        allowed = "text, image_url, input_audio" if role == "user" else "text"
        message = f"{where}: content part type {kind!r} is not supported in {role} messages (allowed: {allowed})"
        raise invalid(message, where)
    if kind == "input_audio":
        return {"type": "audio", "audio": decode_audio(part.get("input_audio"), f"{where}.input_audio")}
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}.image_url must be an object with a 'url' string", f"{where}.image_url")
    image = decode_image(url, f"{where}.image_url", media.allow_remote_images, media.max_bytes)
    return {"type": "image", "image": image}


def _unicode(text: str, where: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which are not text the tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(f"{where} is not valid Unicode: {e.reason} at character {e.start}", where) from None
    return text


def _sampling(body: dict) -> SamplingOptions:
    sampling = SamplingOptions(
        temperature=_number(body, "temperature", 0.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_get(body, "top_k", int, 0),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        seed=_get(body, "seed", int, None),
    )
    if sampling.seed is not None and not 0 <= sampling.seed < 2**64:
        raise invalid(f"seed must be in [0, 2**64), got {sampling.seed}", "seed")
    try:
        sampling.validate()
    except ValueError as e:
        raise invalid(str(e)) from None
    return sampling


def _max_tokens(body: dict) -> Optional[int]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _get(body, name, int, None)
    if value is not None and value < 1:
        raise invalid(f"{name} must be >= 1, got {value}", name)
    return value


def _stop(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    valid = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
    if not valid or len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop must be a non-empty string or an array of at most {MAX_STOP_SEQUENCES} of them", "stop")
    return stops


def _refuse_unsupported(body: dict) -> None:
    """Options the server cannot honour are refused rather than silently ignored."""
    if body.get("n") not in (None, 1):
        raise invalid("n must be 1: one choice per request", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name, 0) not in (0, None):
            raise invalid(f"{name} is not supported (use repetition_penalty)", name)
    for name in ("logprobs", "tools", "functions"):
        if body.get(name):
            raise invalid(f"{name} is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("response_format must be {'type': 'text'}", "response_format")


def _number(body: dict, name: str, default: float) -> float:
    value = _get(body, name, (int, float), default)
    if not math.isfinite(value):
        raise invalid(f"{name} must be a finite number, got {value}", name)
    return float(value)


def _get(obj: dict, name: str, kind, default, where: str = None, required: bool = False):
    """obj[name] checked against `kind` (JSON null counts as absent); bools are not numbers."""
    value = obj.get(name)
    where = where or name
    if value is None:
        if required:
            raise invalid(f"'{where}' is required", where)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise invalid(f"'{where}' must be {_KIND_NAMES[kind]}, got {type(value).__name__} {value!r}"[:300], where)
    return value


_KIND_NAMES = {(int, float): "a number", int: "an integer", str: "a string", bool: "a boolean", dict: "an object"}
