"""`python -m mlx_gemma3n.server`: load the model once, then serve it over HTTP."""

import argparse
import logging
import os
import signal
import sys
import threading

from ..cli import USER_ERRORS
from .request import MediaPolicy
from .worker import GenerationWorker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mlx_gemma3n.server",
        description="Serve Gemma 3n over the OpenAI chat-completions API.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory, Hub id, or 'demo'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("MLX_GEMMA3N_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MLX_GEMMA3N_API_KEY, else none)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--max-request-mb", type=float, default=64, help="largest request body (and fetched image)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length when a request sets none")
    p.add_argument("--cache-slots", type=int, default=4, help="conversations whose KV cache is kept")
    p.add_argument("--text-only", action="store_true", help="never load the audio/vision towers")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    for name in ("max_request_mb", "max_tokens", "cache_slots"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not 0 <= args.port < 65536:
        p.error("--port must be in 0..65535")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from .app import ServerConfig, create_app
    except ImportError as e:
        sys.exit(f"error: the server needs its extra: pip install 'mlx-gemma3n[server]' ({e})")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        logging.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    # The main thread loads the model and runs every generation; HTTP runs in another thread.
    worker = GenerationWorker(args.model, text_only=args.text_only, cache_slots=args.cache_slots)
    try:
        worker.load()
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    media = MediaPolicy(args.allow_remote_images, int(args.max_request_mb * 2**20))
    app = create_app(worker, ServerConfig(args.model, args.api_key, media, args.max_tokens))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    http = threading.Thread(target=server.run, name="http")
    http.start()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        worker.serve(keep_going=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        worker.shutdown()
        server.should_exit = True
        http.join()
    if not server.started:
        sys.exit(f"error: could not serve on {args.host}:{args.port} (see the log above)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
