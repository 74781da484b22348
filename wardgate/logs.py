"""Logging for operators: text by default, or one JSON object a line (`[gateway] log_format = "json"`)
with the session id (native sessions) and request id (HTTP) of what a line is about, for a log
pipeline to index. Secrets never reach a log line: credentials, keys and tokens are not logged."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging

# The HTTP request being served (set by the API's middleware; echoed as the x-request-id header).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
FIELDS = ("session_id", "user", "connection", "method", "path", "status", "ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str) -> None:
    """Switch every handler of the root logger (and uvicorn's) to `log_format`."""
    if log_format != "json":
        return
    formatter = JsonFormatter()
    for name in ("", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)


http_log = logging.getLogger("wardgate.http")


class RequestIds:
    """ASGI middleware: each HTTP request gets an id (the caller's `x-request-id` when it is a short
    plain token, else a new one), echoed in the answer and on every log line written while it runs;
    at INFO, one line per request with its status and duration. Query strings are not logged: they
    can hold tokens."""

    def __init__(self, app: object) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[operator]
            return
        import secrets
        import time

        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 64 and given.replace("-", "").replace("_", "").isalnum() else secrets.token_hex(8)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: dict) -> None:  # type: ignore[type-arg]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)  # type: ignore[operator]

        try:
            await self.app(scope, receive, send_with_id)  # type: ignore[operator]
        finally:
            if http_log.isEnabledFor(logging.INFO):
                http_log.info("%s %s %s", scope.get("method"), scope.get("path"), status, extra={
                    "method": scope.get("method"), "path": scope.get("path"), "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1)})
            REQUEST_ID.reset(token)
