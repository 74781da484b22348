"""Group commit for `[recording] durability = "fsync"`: records reach the disk before what they
describe goes on.

A writer appends its records to the journal as always (a write to the OS's cache), then asks for a
future that is done once they are on disk. One thread flushes the journal (`fdatasync`) for every
writer that asked before the flush began, so the sessions that wait at the same moment share one
flush: the more of them there are, the more each flush covers. The relay holds a statement (and
what its client sends after it) until its future is done; exec does the same before it runs one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from .journal import Journal, fsync_dir

log = logging.getLogger("wardgate.recording")


def _settle(futures: list[asyncio.Future[None]], error: OSError | None) -> None:
    for fut in futures:
        if fut.done():
            continue  # its session ended meanwhile
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class Syncer:
    def __init__(self, journal: Journal, lock: Any) -> None:
        self.journal = journal
        self._lock = lock  # the recorder's: held while the descriptors to flush are taken
        self._cond = threading.Condition()
        self._waiting: list[asyncio.Future[None]] = []
        self._stopping = False
        self.flushes = 0  # how many fdatasync rounds ran (each covers every writer waiting at its start)
        self._thread = threading.Thread(target=self._run, name="wardgate-fsync", daemon=True)
        self._thread.start()

    def durable(self) -> asyncio.Future[None]:
        """A future done once everything written to the journal before this call is on disk (or failed
        with the OSError that kept it from there)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._cond:
            self._waiting.append(fut)
            self._cond.notify()
        return fut

    def nudge(self) -> None:
        """Flush soon though nobody waits (files finished since are flushed and closed, not kept open)."""
        with self._cond:
            self._waiting.append(None)  # type: ignore[arg-type]
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting and self._stopping:
                    break
                batch, self._waiting = self._waiting, []
            error = self.flush()
            by_loop: dict[Any, list[asyncio.Future[None]]] = {}
            for fut in batch:
                if fut is not None:  # None: a nudge
                    by_loop.setdefault(fut.get_loop(), []).append(fut)
            for loop, futures in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, futures, error)
                except RuntimeError:  # the loop closed: nobody waits any more
                    pass
        self.flush()

    def flush(self) -> OSError | None:
        """Flush every file written so far: those finished since the last flush, then the current one."""
        with self._lock:
            journal = self.journal
            retired, journal.retired = journal.retired, []
            fd = os.dup(journal.fd) if journal.fd >= 0 else -1
            new_entries, journal.dir_dirty = journal.dir_dirty or bool(retired), False
        error = None
        for f in [*retired, fd]:
            if f < 0:
                continue
            try:
                os.fdatasync(f)
            except OSError as exc:
                error = error or exc
            finally:
                os.close(f)
        if new_entries:
            try:
                fsync_dir(journal.dir)
            except OSError as exc:
                error = error or exc
        if error is not None:
            log.error("cannot flush the recording journal to disk: %s", error)
        self.flushes += 1
        return error

    def stop(self) -> None:
        """Flush what is left and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(30)
