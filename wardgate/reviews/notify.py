"""Notifications of review steps: a generic JSON webhook (HMAC-signed) and a Slack incoming webhook.

Sending never blocks a request: steps go to a queue that a task drains, retrying each delivery with
backoff. The signature covers a timestamp and the body:

    X-Wardgate-Timestamp: 1767225600
    X-Wardgate-Signature: sha256=hex(HMAC-SHA256(secret, "1767225600." + body))

so a receiver can check both who sent it and that it is fresh.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

import httpx

from ..config import ReviewSettings

log = logging.getLogger("wardgate.notify")

RETRIES = 5
FIRST_BACKOFF = 0.5


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _slack_text(kind: str, review: dict[str, Any]) -> str:
    who = f"{review['agent']} acting for {review['requester']}" if review.get("agent") else review["requester"]
    statement = review["statement"] if len(review["statement"]) < 500 else review["statement"][:497] + "..."
    verb = {"review.requested": "asks for review", "review.approved": "was approved", "review.rejected": "was rejected",
            "review.revoked": "was revoked", "review.executed": "was run"}.get(kind, kind)
    return (f"Wardgate: a statement by {who} on `{review['connection']}` {verb} "
            f"({review['status']}).\n```{statement}```\n<{review['url']}|Review {review['id']}>")


class Notifier:
    def __init__(self, settings: ReviewSettings) -> None:
        self.webhook_url = settings.webhook_url
        secret = os.environ.get(settings.webhook_secret_env, "") if settings.webhook_secret_env else ""
        self.secret = secret.encode()
        self.slack_url = settings.slack_webhook_url
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url or self.slack_url)

    def send(self, kind: str, review: dict[str, Any]) -> None:
        """Queue a notification; safe from any thread."""
        if not self.enabled or self._queue is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, review))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                kind, review = await self._queue.get()
                at = time.time()
                if self.webhook_url:
                    body = json.dumps({"kind": kind, "at": at, "review": review}, separators=(",", ":")).encode()
                    stamp = str(int(at))
                    headers = {"content-type": "application/json", "x-wardgate-event": kind, "x-wardgate-timestamp": stamp}
                    if self.secret:
                        headers["x-wardgate-signature"] = signature(self.secret, stamp, body)
                    await self._deliver(client, self.webhook_url, body, headers, kind)
                if self.slack_url:
                    body = json.dumps({"text": _slack_text(kind, review)}).encode()
                    await self._deliver(client, self.slack_url, body, {"content-type": "application/json"}, kind)

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], kind: str) -> None:
        delay = FIRST_BACKOFF
        for attempt in range(1, RETRIES + 1):
            try:
                r = await client.post(url, content=body, headers=headers)
                if r.status_code < 300:
                    return
                problem = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if attempt == RETRIES:
                log.error("notification %s not delivered after %d attempts (%s)", kind, RETRIES, problem)
                return
            await asyncio.sleep(delay)
            delay *= 2
