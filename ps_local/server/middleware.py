"""What happens to a /v1 request before FastAPI sees it: the API key, and reading every body as
JSON. Pure ASGI middlewares: they touch nothing of a response (streams stay streams).
"""

from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .api_errors import ApiError


def _is_api(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["path"].startswith("/v1")


class ApiKeyMiddleware:
    """``--api-key``: every /v1 request needs ``Authorization: Bearer KEY``. A middleware rather
    than a route dependency, so that it comes first: FastAPI reads and validates a body before a
    route's dependencies run, and a client without the key should learn nothing else."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _is_api(scope) and not self.authorized(scope):
            error = ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", kind="authentication_error",
                             code="invalid_api_key")
            await JSONResponse(error.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return secrets.compare_digest(given, self.expected)


class JsonBodyMiddleware:
    """Every /v1 body is JSON, whatever its Content-Type says, as OpenAI reads it: FastAPI would
    hand a body sent as ``curl -d`` sends it (form-encoded) to validation as bytes, and the
    client would hear that its JSON object is not one."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _is_api(scope) and scope["method"] == "POST":
            headers = [(name, value) for name, value in scope["headers"] if name != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
