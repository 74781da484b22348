"""Long work taken a slice at a time, so that no session holds the event loop for long.

A long read is handed on in pieces (`take_pieces`), other sessions served between them once a slice of
time is used up; a long statement is read from its message in place and decoded, and encoded for its
record, in slices (`read_statement`, `json_parts`), yielding between them.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import codec

try:
    from ._wire import blank_text, fill_text, text_form
except ImportError:  # built without a C compiler: texts are joined in one go
    blank_text = fill_text = text_form = None  # type: ignore[assignment]

_JSON_STRING = json.encoder.encode_basestring  # a str as a JSON string, in C
_Q, _P = ord("Q"), ord("P")

SLICE = 1 << 20  # bytes a long statement is read or encoded in at a time, other sessions served between


async def read_statement(sql: memoryview, codec_name: str) -> tuple[str, bool, bool] | None:
    """A statement's bytes decoded in slices, yielding between them: its text, whether they are all ASCII,
    and whether there is a backslash (None when they are not valid in the encoding). Every encoding a
    client may use reads ASCII as ASCII, so one decoder reads all. The text is copied into a str made for
    it a slice at a time too (`_wire.blank_text`): one join of 64 MiB held the loop 25 ms, and 200 ms when
    its memory had just been given back to the system."""
    ascii_only, backslash = True, False
    for i in range(0, len(sql), SLICE):
        piece = bytes(sql[i:i + SLICE])
        ascii_only = ascii_only and piece.isascii()
        backslash = backslash or b"\\" in piece
        await asyncio.sleep(0)
    if ascii_only and blank_text is not None:
        text = blank_text(len(sql), 127)
        for i in range(0, len(sql), SLICE):
            fill_text(text, i, sql[i:i + SLICE])
            await asyncio.sleep(0)
        return text, True, backslash
    decoder = codecs.getincrementaldecoder(codec_name)()
    parts = []
    try:
        for i in range(0, len(sql), SLICE):
            parts.append(decoder.decode(bytes(sql[i:i + SLICE]), i + SLICE >= len(sql)))
            await asyncio.sleep(0)
    except UnicodeDecodeError:
        return None
    if blank_text is None:  # built without the C module: one join
        return "".join(parts), ascii_only, backslash
    # Each part is in the form its largest character asks for, so the largest of their forms is the whole's.
    text = blank_text(sum(map(len, parts)), max(map(text_form, parts), default=127))
    at = 0
    for part in parts:
        fill_text(text, at, part)
        at += len(part)
        await asyncio.sleep(0)
    return text, ascii_only, backslash


async def json_parts(text: str) -> list[bytes]:
    """`text` as a JSON string in UTF-8, in slices (written as they are, never joined), yielding between them."""
    parts = []
    for i in range(0, len(text), SLICE):
        parts.append(_JSON_STRING(text[i:i + SLICE])[1:-1].encode("utf-8", "surrogatepass"))
        await asyncio.sleep(0)
    return [b'"', *parts, b'"']


PIECE = 32 * 1024  # bytes of a long read taken at a time
TIME_SLICE = 0.005  # seconds a session's pieces may take before other sessions are served


def take_pieces(backlog: deque[list], take: Callable[[bytes], None], stop: Callable[[], bool]) -> bool:
    """Hand `take` the pieces of the reads in `backlog` ([data, offset], in order) until it is empty (True),
    or until a slice of time is used up (False: call again, after other callbacks have run). `stop()` says
    the pieces can wait no more here (the session ended, or its bytes are held): the rest stays in `backlog`."""
    deadline = time.perf_counter() + TIME_SLICE
    while backlog:
        entry = backlog[0]
        data, at = entry
        if at == 0 and len(data) <= PIECE:
            backlog.popleft()
            take(data)
        else:
            piece = data[at:at + PIECE]
            if at + PIECE >= len(data):
                backlog.popleft()
            else:
                entry[1] = at + PIECE
            take(piece)
        if stop():
            return True
        if backlog and time.perf_counter() > deadline:
            return False
    return True


def sql_of(mtype: int, body: bytes) -> bytes:
    """The statement text of a Query or Parse body."""
    return codec.read_cstr(body, 0 if mtype == _Q else codec.read_cstr(body, 0)[1])[0]


def sql_view(mtype: int, body: bytes) -> memoryview:
    """The statement text of a Query or Parse body, in place."""
    start = 0
    if mtype == _P:  # its text follows its name
        start = body.find(0) + 1
        if not start:
            raise codec.ProtocolViolation("unterminated string in message")
    end = body.find(0, start)
    if end < 0:
        raise codec.ProtocolViolation("unterminated string in message")
    return memoryview(body)[start:end]



class Outbox:
    """Writes to one side of a session. What is long goes a slice at a time, one slice a turn of the loop,
    and what is written meanwhile waits behind it: a transport writes all it is given in the callback that
    gives it, and for TLS encrypts it there (a 60 MB row held the loop 150 ms and more). While it is
    `busy`, the session reads nothing more from the other side: `on_change` runs when it becomes busy,
    and when it is empty again."""

    __slots__ = ("_peer", "_on_change", "_queue")

    def __init__(self, peer: Any, on_change: Callable[[], None]) -> None:
        self._peer = peer  # what has the transport (a StreamProtocol)
        self._on_change = on_change
        self._queue: deque[memoryview] | None = None

    @property
    def busy(self) -> bool:
        return self._queue is not None

    def send(self, data: bytes) -> None:
        """`write([data])` for the relay's one forward of a read: on the per-message path, so the common
        case costs a length test and nothing more."""
        if self._queue is None and len(data) <= SLICE:
            t = self._peer.transport
            if t is not None:
                t.write(data)
            return
        self.write([data])

    def write(self, parts: list[bytes]) -> None:
        queue = self._queue
        if queue is None and sum(map(len, parts)) <= SLICE:  # the common case: written at once
            t = self._peer.transport
            if t is not None:
                t.writelines(parts)
            return
        first = queue is None
        if first:
            queue = self._queue = deque()
        for part in parts:
            view = memoryview(part)
            for i in range(0, len(view), SLICE):
                queue.append(view[i:i + SLICE])
        if first:
            self._on_change()  # busy now: the reading of the other side pauses
            self._next()

    def clear(self) -> None:
        self._queue = None

    def _next(self) -> None:
        queue = self._queue
        if queue is None:
            return
        t = self._peer.transport
        if t is None or t.is_closing():
            self._queue = None
            return
        t.write(queue.popleft())
        if queue:
            asyncio.get_running_loop().call_soon(self._next)
        else:
            self._queue = None
            self._on_change()
