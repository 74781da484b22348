"""Classification of large statements in worker processes, with a time budget.

Classifying costs time in proportion to a statement's size (parsing, then the walk in Python), up to
seconds for a statement of a few MiB. Done on the event loop, one session's big statement would stall
every other session; done in a thread, it would still hold the interpreter's lock (the JSON decoder
and the walk run without releasing it). So statements longer than `INLINE_CHARS` are classified in a
separate process, and the session that sent one waits for the answer while every other is served.

A statement not classified within the budget is refused as too large or complex to inspect: its
worker is killed, and a fresh one takes its place. Workers are started on first use and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle  # noqa: S403 - only between this process and the workers it started itself
import struct
import subprocess
import sys

from .classify import Classification, classify

log = logging.getLogger(__name__)

# Up to this many characters, a statement is classified where it is decided: about 10 ms in the worst
# case measured (a list of 2,000 constants), under a millisecond for ordinary statements.
INLINE_CHARS = 2048
TIMEOUT = 10.0  # seconds a worker may spend on one statement
WORKERS = 2
STARTUP_TIMEOUT = 60.0  # seconds a new worker may take to start (import the parser)
WORKER_NICENESS = 10
TRIM_AFTER = 8 << 20  # bytes of a statement after which a worker gives its memory back to the system

_LEN = struct.Struct("!Q")
_SLICE = 1 << 20


def too_costly(seconds: float) -> Classification:
    return Classification(error=f"the statement is too large or complex for the gateway to inspect within "
                                f"{seconds:g} s; split it into smaller statements", uninspected=True)


NO_WORKER = Classification(error="the gateway could not start a worker to inspect this long statement; try again, "
                                 "or send a shorter one", uninspected=True)


def _send(fd: int, data: memoryview) -> None:
    """Write `data` to the blocking pipe `fd` whole, from a thread: os.write lets go of the interpreter
    while the pipe takes it (the worker reading), where the loop's own pipe transport held the loop
    10 ms and more for each MiB. A pipe closed by a worker that was killed raises OSError."""
    os.write(fd, _LEN.pack(len(data)))
    for i in range(0, len(data), _SLICE):
        view = data[i:i + _SLICE]
        while view:
            view = view[os.write(fd, view):]


class _Worker:
    def __init__(self, proc: subprocess.Popen[bytes], to_worker: int, stdout: asyncio.StreamReader,
                 reading: asyncio.BaseTransport) -> None:
        self.proc = proc
        self.to_worker = to_worker  # the writing end of the worker's stdin, blocking: written from threads
        self.stdout = stdout
        self._reading = reading
        self._sending: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)

    async def classify(self, text: str, utf8: bytes | memoryview | None = None) -> Classification:
        stdout = self.stdout
        data = memoryview(utf8 if utf8 is not None else text.encode("utf-8", "surrogatepass"))
        sending = self._sending = asyncio.get_running_loop().run_in_executor(None, _send, self.to_worker, data)
        try:
            (n,) = _LEN.unpack(await stdout.readexactly(_LEN.size))  # it answers once it has read it all
            answer = await stdout.readexactly(n)
        finally:
            if not sending.done():
                self.kill()  # cancelled or timed out mid-send: the thread's write fails and ends
        await sending  # done: an error writing is the worker's end, and raises here
        return pickle.loads(answer)  # noqa: S301 - written by our own worker

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._reading.close()
        # The pipe is closed once no thread writes to it (the write fails as the worker dies): closed under
        # a thread still writing, its number could be another file's by the time the thread wrote again.
        if self._sending is not None and not self._sending.done():
            self._sending.add_done_callback(lambda _: self._close())
        else:
            self._close()

    def _close(self) -> None:
        if self.to_worker >= 0:
            with contextlib.suppress(OSError):
                os.close(self.to_worker)
            self.to_worker = -1


class Offload:
    """A few worker processes that classify statements off the event loop."""

    def __init__(self, workers: int = WORKERS, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self._size = workers
        # One slot per worker at work; a worker killed gives its slot back, and the next taker starts another.
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._dying: set[_Worker] = set()  # killed, not yet reaped
        self._turns: asyncio.Semaphore | None = None

    def turn(self) -> asyncio.Semaphore:
        """Held by a session while it reads, classifies and encodes its long statements: as many at a time
        as there are workers, so that the memory they take is bounded (the others wait, their clients
        unread)."""
        if self._turns is None:
            self._turns = asyncio.Semaphore(self._size)
        return self._turns

    async def classify_long(self, text: str) -> Classification | None:
        """`text`'s classification made in a worker when it is too long to make inline, else None (the
        caller's decision classifies it, inline)."""
        return await self.classify(text) if len(text) > INLINE_CHARS else None

    async def classify(self, text: str, utf8: bytes | memoryview | None = None) -> Classification:
        """`text` classified in a worker, or refused as too costly when the budget runs out; `utf8`, the
        text in UTF-8 when the caller has it already."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._size)
        async with self._slots:
            try:
                worker = self._idle.pop() if self._idle else await self._start()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.error("cannot start a statement classification worker: %s", exc)
                return NO_WORKER  # refused, as anything the gateway cannot inspect
            try:
                result = await asyncio.wait_for(worker.classify(text, utf8), self.timeout)
            except (TimeoutError, asyncio.IncompleteReadError, OSError, pickle.UnpicklingError) as exc:
                # Killed whatever it was doing: a worker past its budget, or one that died, is not used again.
                log.warning("statement classification in a worker failed: %s", type(exc).__name__)
                self._drop(worker)
                return too_costly(self.timeout)
            except BaseException:
                self._drop(worker)  # cancelled (the session ended): the worker may be mid-answer
                raise
            self._idle.append(worker)
            return result

    async def _start(self) -> _Worker:
        loop = asyncio.get_running_loop()
        reading, writing = os.pipe()
        try:
            # subprocess starts it with vfork, which copies nothing of this process: asyncio's and uvloop's
            # own spawning forks, and the copy of a gateway holding a long statement took the loop 35 ms+.
            proc = subprocess.Popen([sys.executable, "-m", "wardgate.sql.offload"], stdin=reading,  # noqa: S603, ASYNC220
                                    stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except BaseException:
            os.close(writing)
            raise
        finally:
            os.close(reading)
        try:
            stdout = asyncio.StreamReader(limit=1 << 20)
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), proc.stdout)
        except BaseException:
            proc.kill()
            os.close(writing)
            raise
        worker = _Worker(proc, writing, stdout, transport)
        self._all.add(worker)
        try:
            # Ready once it has imported the parser: the time budget is for classifying, not for starting.
            await asyncio.wait_for(stdout.readexactly(1), STARTUP_TIMEOUT)
        except BaseException:
            self._drop(worker)
            raise
        return worker

    def _drop(self, worker: _Worker) -> None:
        worker.kill()
        self._all.discard(worker)
        # Reaped once it has exited, so that no process (or its transport) outlives the loop that made it.
        self._dying.add(worker)
        reaping = asyncio.ensure_future(worker.wait())
        reaping.add_done_callback(lambda _: self._dying.discard(worker))

    async def close(self) -> None:
        for worker in list(self._all):
            self._drop(worker)
        for worker in list(self._dying):
            await worker.wait()
        self._idle = []


def _give_back() -> None:
    """A long statement's parse takes several times its size; after it the heap is trimmed (glibc), or
    the worker would keep hundreds of MB it no longer uses (142 MiB each after 120 MB statements)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _serve() -> None:
    """The worker: statements in, their pickled classifications out, until stdin closes."""
    # Below the gateway's priority: on a machine with few cores, a long statement's classification would
    # otherwise take the CPU from the loop serving every other session (their p99 doubled on 2 cores).
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    read, write = sys.stdin.buffer.read, sys.stdout.buffer
    write.write(b"R")  # ready
    write.flush()
    while True:
        head = read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (n,) = _LEN.unpack(head)
        text = read(n).decode("utf-8", "surrogatepass")
        out = pickle.dumps(classify(text), protocol=pickle.HIGHEST_PROTOCOL)
        del text
        write.write(_LEN.pack(len(out)) + out)
        write.flush()
        if n >= TRIM_AFTER:
            _give_back()


if __name__ == "__main__":
    _serve()
