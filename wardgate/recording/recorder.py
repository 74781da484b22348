"""The recorder: writes records to the journal on the hot path and drains them into the store."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ..store import Store
from .journal import Journal, encode, read_records

log = logging.getLogger("wardgate.recording")


class Recorder:
    def __init__(self, store: Store, directory: Path, *, flush_interval: float = 0.2) -> None:
        self.store = store
        self.journal = Journal(directory)
        self.flush_interval = flush_interval
        self._lock = asyncio.Lock()
        self.failed_flushes = 0

    @property
    def instance(self) -> str:
        return self.journal.instance

    def write(self, records: list[dict[str, Any]]) -> None:
        """Durable on return. Raises OSError if the journal cannot be written: callers fail closed."""
        self.journal.write(encode(records))

    def recover(self) -> int:
        """Apply journal files left by processes that died, and close the sessions those processes held."""
        count = 0
        dead = self.journal.dead_instances()
        for path, fd in self.journal.orphans():
            records = list(read_records(path))
            open_sessions = {r["sid"] for r in records if r["k"] == "session" and r.get("status", "active") == "active"}
            open_sessions -= {r["sid"] for r in records if r["k"] == "end"}
            records += [
                {"k": "end", "sid": sid, "at": os.stat(path).st_mtime, "reason": "the gateway process ended unexpectedly"}
                for sid in sorted(open_sessions)
            ]
            self.store.apply_records(records)
            count += len(records)
            path.unlink()
            os.close(fd)
        if dead:
            self.store.close_sessions_of(dead, "the gateway process ended unexpectedly")
            self.journal.forget_instances(dead)
        return count

    def _drain(self, path: Path, fd: int) -> None:
        self.store.apply_records(list(read_records(path)))
        path.unlink()
        os.close(fd)

    async def flush(self) -> None:
        async with self._lock:
            old = self.journal.rotate()
            pending = self.journal.orphans() + ([old] if old else [])
            pending.sort(key=lambda item: item[0].name)
            for i, (path, fd) in enumerate(pending):
                try:
                    await asyncio.to_thread(self._drain, path, fd)
                except Exception:  # noqa: BLE001 - the store may be down; the files stay for the next try
                    self.failed_flushes += 1
                    log.exception("could not apply journal %s to the store; will retry", path.name)
                    for _, left in pending[i:]:
                        os.close(left)
                    return

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def close(self) -> None:
        await self.flush()
        async with self._lock:
            last = self.journal.close()
            if last:
                await asyncio.to_thread(self._drain, *last)
