"""The OpenAI-compatible server: a real `python -m mlx_gemma3n.server --model demo` process,
driven with the official `openai` client and with raw HTTP. Every answer is compared with
what the library gives in this process for the same messages."""

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
from PIL import Image

import mlx_gemma3n
from mlx_gemma3n import SamplingOptions
from mlx_gemma3n.server.responses import StopText

ASSETS = Path(__file__).parents[1] / "examples" / "assets"
KEY = "sk-test-key"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    cache: Path

    @property
    def address(self):
        host, port = self.url.split("//")[1].split(":")
        return host, int(port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("server")
    log = cache / "server.log"
    url = f"http://127.0.0.1:{_free_port()}"
    args = ["--model", "demo", "--port", url.rsplit(":", 1)[1], "--api-key", KEY, "--max-request-mb", "2"]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlx_gemma3n.server", *args],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, MLX_GEMMA3N_CACHE=str(cache)),
        )
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server did not start:\n" + log.read_text()
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            time.sleep(0.3)
    yield Server(url, process, log, cache)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()[-4000:]
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def library(server):
    """The same demo checkpoint, loaded in this process."""
    old = os.environ.get("MLX_GEMMA3N_CACHE")
    os.environ["MLX_GEMMA3N_CACHE"] = str(server.cache)
    try:
        return mlx_gemma3n.load("demo")
    finally:
        if old is None:
            del os.environ["MLX_GEMMA3N_CACHE"]
        else:
            os.environ["MLX_GEMMA3N_CACHE"] = old


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def reference(library, messages, max_tokens, temperature=0.0, seed=None) -> str:
    model, processor = library
    sampling = SamplingOptions(temperature=temperature, seed=seed)
    return mlx_gemma3n.generate(model, processor, messages, max_tokens=max_tokens, sampling=sampling)


def prompt_tokens(library, messages) -> int:
    return len(library[1](messages).token_ids)


def chat(client, messages, **kw):
    return client.chat.completions.create(model="demo", messages=messages, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_bytes(seconds: float, fmt: str) -> bytes:
    """The speech clip, repeated with short pauses to `seconds`, encoded as `fmt`."""
    speech, rate = soundfile.read(ASSETS / "speech.flac", dtype="float32")
    pause = np.zeros(int(0.4 * rate), np.float32)
    clip = np.concatenate([speech, pause] * int(np.ceil(seconds * rate / (len(speech) + len(pause)))))
    out = io.BytesIO()
    soundfile.write(out, clip[: int(seconds * rate)], rate, format=fmt.upper())
    return out.getvalue()


def post(server, body, key=KEY, path="/v1/chat/completions"):
    """Raw HTTP POST; returns (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.models.retrieve("gpt-4")


def test_plain_chat_equals_the_library(client, library):
    r = chat(client, USER, max_tokens=12)
    assert r.choices[0].message.content == reference(library, USER, 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == prompt_tokens(library, USER)
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client):
    options = {"max_tokens": 16, "temperature": 0.9, "seed": 5, "top_p": 0.9}
    whole = chat(client, USER, **options)
    chunks = list(chat(client, USER, stream=True, stream_options={"include_usage": True}, **options))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(server):
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=120)
    body = {"messages": USER, "max_tokens": 3, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_length_limits_and_alias(client):
    for name in ("max_tokens", "max_completion_tokens"):
        r = chat(client, USER, **{name: 5})
        assert r.usage.completion_tokens <= 5
        assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 5 else "stop")


def test_stop_sequences_cut_the_reply(client):
    full = chat(client, USER, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3, full
    expected = full[: full.find(stop)]
    cut = chat(client, USER, max_tokens=24, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = chat(client, USER, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


@pytest.mark.parametrize(
    "pieces,stops,emitted",
    [
        (["ab", "cXY", "Zd"], ["XYZ"], ["ab", "c", ""]),  # held back across pieces, then cut
        (["aX", "Yb"], ["XYZ"], ["a", "XYb"]),  # a false start is released
        (["abc"], ["b", "c"], ["a"]),  # the earliest sequence wins
    ],
)
def test_stop_text_holds_back_partial_matches(pieces, stops, emitted):
    stop = StopText(stops)
    out = []
    for piece in pieces:
        out.append(stop.add(piece))
        if stop.stopped:
            break
    assert out == emitted


def test_image_as_data_uri_then_local_path_and_file_uri(client, library):
    """The image is encoded once (the tower is slow on a CPU): the later turns send it as a path
    and a file: URI, whose pixels must equal the data URI's for the conversation's cache to be
    reused. One-token replies: the cache then holds exactly the prompt, so the match does not
    depend on how the random model's reply re-tokenizes."""
    cat = ASSETS / "cat.png"
    question = [{"type": "text", "text": "What is this?"}]
    conversation, held = [], 0
    for turn, url in enumerate((f"data:image/png;base64,{b64(cat.read_bytes())}", str(cat), cat.as_uri())):
        image = {"type": "image_url", "image_url": {"url": url}}
        conversation[:1] = [{"role": "user", "content": [image] + question}]
        r = chat(client, conversation, max_tokens=8 if turn == 2 else 1)
        assert r.usage.prompt_tokens_details.cached_tokens == held, url
        held = r.usage.prompt_tokens
        reply = r.choices[0].message.content
        conversation += [{"role": "assistant", "content": reply}, {"role": "user", "content": "More?"}]
    local = [{"role": "user", "content": [{"type": "image", "image": str(cat)}] + question}] + conversation[1:-2]
    assert prompt_tokens(library, local) == held > 256  # the image's soft tokens are in the prompt
    assert reply == reference(library, local, 8)  # as a fresh prefill of the whole conversation


def test_audio_clip(client, library):
    data = audio_bytes(4.0, "wav")
    clip = soundfile.read(io.BytesIO(data), dtype="float32")
    message = mlx_gemma3n.user_message("Transcribe this audio.", audio=[clip])
    content = [{"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}},
               {"type": "text", "text": "Transcribe this audio."}]
    r = chat(client, [{"role": "user", "content": content}], max_tokens=8)
    assert r.choices[0].message.content == reference(library, [message], 8)
    assert r.usage.prompt_tokens == prompt_tokens(library, [message]) > 188


def test_long_mp3_is_split_into_30s_segments(client, library):
    data = audio_bytes(35.0, "mp3")
    content = [{"type": "input_audio", "input_audio": {"data": b64(data), "format": "mp3"}}]
    r = chat(client, [{"role": "user", "content": content}], max_tokens=2)
    text_only = prompt_tokens(library, [{"role": "user", "content": ""}])
    clip = soundfile.read(io.BytesIO(data), dtype="float32")
    blocks = library[1]([mlx_gemma3n.user_message("", audio=[clip])])
    assert len(blocks.audio) == 2  # 35 s: two segments, as the CLI splits it
    assert r.usage.prompt_tokens == len(blocks.token_ids) >= text_only + 2 * 188


def test_four_clients_at_once_get_their_own_answers(client, library):
    prompts = ["one", "two words", "three little words", "a fourth and last prompt"]
    expected = [reference(library, p, 16, temperature=0.9, seed=i) for i, p in enumerate(prompts)]

    def ask(i):
        return chat(client, [{"role": "user", "content": prompts[i]}], max_tokens=16, temperature=0.9, seed=i)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert [a.choices[0].message.content for a in answers] == expected
    assert len(set(expected)) == 4


def _turns(library, question: str):
    """(first turn, second turn) of a conversation whose first reply, sent back as text,
    re-tokenizes to the ids the model generated -- which a cache reuse needs, as it matches
    ids. A random-weight model's reply may not (e.g. two pieces that merge), so the
    question is one of a few for which it does."""
    model, processor = library
    first = [{"role": "user", "content": question}]
    steps = list(mlx_gemma3n.stream_generate(model, processor, first, max_tokens=10))
    reply = "".join(r.text for r in steps)
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And dogs?"}]
    held = processor(first).token_ids + [r.token for r in steps]
    return first, second, processor(second).token_ids[: len(held)] == held


def test_next_turn_reuses_the_conversation_cache(client, library):
    questions = ["Tell me about cats.", "What do cats eat?", "Cats?", "Why do cats purr?", "Name a cat."]
    turns = (_turns(library, q) for q in questions)
    first, second, ok = next((t for t in turns if t[2]), (None, None, False))
    assert ok, "no question's reply re-tokenizes to its own ids"
    assert chat(client, first, max_tokens=10).choices[0].message.content == second[1]["content"]
    r = chat(client, second, max_tokens=10)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert prompt_tokens(library, first) <= cached < r.usage.prompt_tokens
    assert r.choices[0].message.content == reference(library, second, 10)  # as a fresh prefill


def _wait_for(log: Path, pattern: str, count: int = 1) -> list:
    """The matches of `pattern` in the server log, once there are `count` of them."""
    deadline = time.monotonic() + 60
    while len(found := re.findall(pattern, log.read_text())) < count:
        assert time.monotonic() < deadline, f"not {count} of {pattern!r} in the server log"
        time.sleep(0.2)
    return found


def test_disconnect_stops_generation_mid_stream_and_in_the_queue(server, client):
    host, port = server.address
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1500}
    running = http.client.HTTPConnection(host, port, timeout=120)
    running.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
    r = running.getresponse()
    events = []
    while len(events) < 2:  # the role chunk and the first text chunk
        line = r.readline()
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
    queued = http.client.HTTPConnection(host, port, timeout=120)
    queued.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    time.sleep(1)  # it waits behind the running one
    skipped = server.log.read_text().count("cancelled while queued")
    for conn in (queued, running):
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    [(generated, finish)] = _wait_for(server.log, rf"{events[0]['id']}: .* (\d+) generated, (\w+)")
    assert finish == "cancelled" and int(generated) < 1500
    _wait_for(server.log, "cancelled while queued", count=skipped + 1)
    assert chat(client, USER, max_tokens=2).usage.completion_tokens <= 2  # still serving


class _Layer:  # what PromptCache.processed reads
    offset = 0


def test_a_different_image_is_not_served_from_the_cache():
    """Same token ids (placeholders), different pixels: the cached conversation must not match."""
    from mlx_gemma3n.processor import PromptInputs
    from mlx_gemma3n.server.conversations import ConversationCaches, media_key

    caches = ConversationCaches(lambda: mlx_gemma3n.PromptCache([_Layer()]), slots=2)
    ids = [2, 5, 7, 9]
    image = np.zeros((3, 4, 4), np.float32)
    held = caches.take(ids, media_key(PromptInputs(ids, [image])))
    held.tokens, held.cache[0].offset = ids + [11, 13], 5  # the last generated id is not held
    longer = ids + [11, 12]
    assert caches.take(longer, media_key(PromptInputs(longer, [image]))) is held
    assert caches.take(longer, media_key(PromptInputs(longer, [image + 1]))) is not held
    assert caches.take(longer, media_key(PromptInputs(longer, [image]))) is held  # still kept


def huge(n):
    return "word " * n


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"\xff\xfe{}", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"model": "gpt-4", "messages": USER}, 404, "model 'gpt-4' not found"),
        ({"model": "demo"}, 422, "'messages' must be a non-empty array"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]}, 422, "'video_url' is not supported"),
        ({"messages": [{"role": "assistant", "content": [{"type": "image_url"}]}]}, 422, "not supported in assistant messages"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, 422, "not valid Unicode"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 422, "alternate"),
        ({"messages": USER, "temperature": "hot"}, 422, "'temperature' must be a number"),
        ({"messages": USER, "temperature": -1}, 422, "temperature must be >= 0"),
        ({"messages": USER, "top_p": 1.5}, 422, "top_p must be in (0, 1]"),
        ({"messages": USER, "seed": -1}, 422, "seed must be in [0, 2**64)"),
        ({"messages": USER, "max_tokens": 0}, 422, "max_tokens must be >= 1"),
        ({"messages": USER, "max_tokens": True}, 422, "'max_tokens' must be an integer"),
        ({"messages": USER, "n": 3}, 422, "n must be 1"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop must be"),
        ({"messages": USER, "max_tokens": 5000}, 400, "exceeds the model's context of 2048 tokens"),
        ({"messages": [{"role": "user", "content": huge(3000)}]}, 400, "exceeds the model's context"),
    ],
)
def test_malformed_requests_get_openai_errors(server, body, status, message):
    code, reply = post(server, body)
    assert code == status, reply
    assert message in reply["error"]["message"] and "Traceback" not in json.dumps(reply)


def _image_part(url):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def _audio_part(data, fmt="wav"):
    part = {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
    return {"messages": [{"role": "user", "content": [part]}]}


@pytest.mark.parametrize(
    "body,message",
    [
        (_image_part("data:image/png;base64,@@@"), "not valid base64"),
        (_image_part("data:image/png;base64," + b64(b"not an image at all")), "image does not decode"),
        (_image_part("data:text/plain;base64,aGk="), "data:image/<type>;base64"),
        (_image_part("http://127.0.0.1:9/cat.png"), "remote image URLs are refused"),
        (_image_part("/nonexistent/cat.png"), "image file not found: /nonexistent/cat.png"),
        (_image_part(str(Path(__file__))), "not an image file"),
        (_audio_part(b64(b"RIFF....WAVEfmt garbage")), "does not decode as wav audio"),
        (_audio_part(b64(b"x"), fmt="aac"), "format must be one of wav, mp3, flac, ogg"),
    ],
)
def test_media_that_does_not_decode_is_a_400(server, body, message):
    code, reply = post(server, body)
    assert code == 400, reply
    assert message in reply["error"]["message"]


def test_remote_images_are_fetched_only_when_allowed():
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from mlx_gemma3n.server.errors import APIError
    from mlx_gemma3n.server.media import decode_image

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(ASSETS))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as http_server:
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{http_server.server_address[1]}/cat.png"
        image = decode_image(url, "image_url", allow_remote=True, max_bytes=1 << 20)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(ASSETS / "cat.png")))
        for allow, limit, message in ((False, 1 << 20, "refused"), (True, 100, "larger than 100 bytes")):
            with pytest.raises(APIError, match=message):
                decode_image(url, "image_url", allow_remote=allow, max_bytes=limit)
        with pytest.raises(APIError, match="could not fetch"):
            decode_image(url + ".missing", "image_url", allow_remote=True, max_bytes=1 << 20)
        http_server.shutdown()


def test_oversized_body_is_a_413(server):
    """Refused from its Content-Length before it is sent, or once a chunked body passes 2 MB."""
    host, port = server.address
    headers = {"Authorization": f"Bearer {KEY}"}
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in {**headers, "Content-Length": str(3 << 20)}.items():
        conn.putheader(name, value)
    conn.endheaders()
    chunked = http.client.HTTPConnection(host, port, timeout=60)
    body = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
    chunked.request("POST", "/v1/chat/completions", pieces, headers, encode_chunked=True)
    for c in (conn, chunked):
        r = c.getresponse()
        assert r.status == 413 and "larger than the server's limit" in json.loads(r.read())["error"]["message"]


def test_api_key_is_required(server):
    for key in (None, "sk-wrong"):
        code, reply = post(server, {"messages": USER}, key=key)
        assert code == 401 and "API key" in reply["error"]["message"]
    request = urllib.request.Request(server.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 401


def test_unknown_route_is_a_json_404(server):
    code, reply = post(server, {}, path="/v1/completions/nothing")
    assert code == 404 and "Not Found" in reply["error"]["message"]
