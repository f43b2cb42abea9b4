"""Images and audio inside chat messages: `image_url` (data: URI, local path, or a remote URL
when allowed) and `input_audio` (base64). Decoding happens here, before the request is queued,
so that media that do not decode are refused with a 400 naming the message part."""

import base64
import binascii
import io
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from .errors import bad_request

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
_FETCH_TIMEOUT_S = 20


def decode_image(url: str, where: str, allow_remote: bool, max_bytes: int):
    """An `image_url` as something `Processor` takes: a PIL image, or a local path."""
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not header.lower().startswith("data:image/") or ";base64" not in header.lower():
            raise bad_request(f"{where}: a data URI image must be 'data:image/<type>;base64,...'", where)
        return _image_from_bytes(_b64decode(payload, where), where)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise bad_request(
                f"{where}: remote image URLs are refused ({url}); send the image as a data: URI, "
                "or start the server with --allow-remote-images",
                where,
            )
        return _image_from_bytes(_fetch(url, where, max_bytes), where)
    if scheme == "file":
        return unquote(urlparse(url).path)
    if len(scheme) > 1:  # one letter is a Windows drive, as in C:/photo.png
        raise bad_request(f"{where}: unsupported image URL scheme {scheme!r}", where)
    return str(Path(url).expanduser())


def decode_audio(part, where: str):
    """An `input_audio` object ({"data": base64, "format": "wav"|...}) as (samples, rate)."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise bad_request(f"{where}: input_audio must be an object with base64 'data'", where)
    fmt = part.get("format")
    if fmt not in AUDIO_FORMATS:
        allowed = ", ".join(AUDIO_FORMATS)
        raise bad_request(f"{where}: input_audio format must be one of {allowed}, got {fmt!r}", where)
    data = _b64decode(part["data"], where)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise bad_request(f"{where}: input_audio does not decode as {fmt} audio: {e}", where) from None
    return np.ascontiguousarray(samples.mean(axis=1)), rate


def _b64decode(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: data is not valid base64", where) from None


def _image_from_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now, so corrupt data is refused before the request is queued
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{where}: image does not decode: {e}", where) from None


def _fetch(url: str, where: str, max_bytes: int) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as r:
            data = r.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"{where}: could not fetch {url}: {e}", where) from None
    if len(data) > max_bytes:
        raise bad_request(f"{where}: {url} is larger than {max_bytes} bytes", where)
    return data
