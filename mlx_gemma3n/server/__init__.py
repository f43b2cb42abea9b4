"""An OpenAI-compatible HTTP server: `python -m mlx_gemma3n.server --model <checkpoint>`.

Needs the `server` extra (`pip install 'mlx-gemma3n[server]'`: starlette and uvicorn).
`GET /v1/models`, `POST /v1/chat/completions` (streamed or not; text, images, audio), and
`GET /health`. One worker thread owns the model (see `worker`)."""
