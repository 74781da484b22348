"""Cross-replica events over PostgreSQL LISTEN/NOTIFY, on one channel.

A change that other replicas must act on at once is announced inside the store transaction that
makes it (`Store.announce`): PostgreSQL delivers a NOTIFY at commit, so no replica hears of a change
it cannot read yet, and any door announces (the CLI too). Each gateway listens (`Bus.run`) and hands
`topic:key` payloads to its handlers: a review decided on replica A wakes the long-polls waiting on
B; a credential revoked on A ends its sessions on B.

On the embedded SQLite store there is one gateway, whose in-process wake-ups do the same. A listener
that lost its connection misses what was said meanwhile; it tells its handlers ("*" topic) when it
is back, so they look again, and their owners keep a slow check of their own besides.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("wardgate.bus")

CHANNEL = "wardgate_events"


def conninfo(store_url: str) -> str | None:
    """The libpq URL of a PostgreSQL store, or None for any other."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if store_url.startswith(prefix):
            return "postgresql://" + store_url[len(prefix):]
    return None


class Bus:
    def __init__(self, store_url: str) -> None:
        self.url = conninfo(store_url)
        self.handlers: dict[str, list[Callable[[str], None]]] = {}
        self.listening = False

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def on(self, topic: str, handler: Callable[[str], None]) -> None:
        """Call `handler(key)` for each `topic:key` heard; topic "*" hears that the listener reconnected."""
        self.handlers.setdefault(topic, []).append(handler)

    def dispatch(self, payload: str) -> None:
        topic, _, key = payload.partition(":")
        for handler in self.handlers.get(topic, ()):
            try:
                handler(key)
            except Exception:  # noqa: BLE001 - one handler's fault must not silence the others
                log.exception("event handler for %s failed", topic)

    async def run(self) -> None:
        if self.url is None:
            return
        import psycopg

        backoff = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if not self.listening:
                        self.listening = True
                        self.dispatch("*:")  # what was said while nobody listened: look again
                    backoff = 0.5
                    async for note in conn.notifies():
                        self.dispatch(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store is away: listen again when it is back
                if self.listening:
                    log.warning("lost the store's event channel (%s); reconnecting", exc)
            self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
