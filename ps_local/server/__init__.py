"""``ps-local serve``: an OpenAI-compatible HTTP server (the ``server`` extra: FastAPI, uvicorn,
sse-starlette)."""
