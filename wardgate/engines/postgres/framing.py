"""Zero-copy framing of an established session's byte stream.

A `Framer` finds message boundaries in what one read returned. Messages of the types it was told
to inspect are returned whole (buffered across reads, bounded); every other message streams
through as it arrives, so a 1 GB DataRow or CopyData never sits in memory. When a read is consumed
whole, the read's own buffer is forwarded unchanged. A message that spans reads is kept as the list of
those reads and joined once, when its last byte has come: its cost is linear in its size. A message of
LARGE bytes or more is copied instead, read by read, into a message and a body made for it (`blank`),
so that no callback copies all of it at once (64 MiB took 50 ms, 400 ms on memory not yet touched); what
follows it in its last read is left for the caller to feed next (`take_rest`).

The per-message loop is `scan`, in C (`_wire.c`) when it is built, else the Python reference below;
both have the same contract and the tests hold them to it.
"""

from __future__ import annotations

import array
import struct

from .codec import ProtocolViolation

_U32 = struct.Struct("!I")
_unpack_len = _U32.unpack_from

ROWS = 0x100  # flag on a message type: a run of whole messages of that type, (type | ROWS, end, start)
DONE, HOLD, SKIP, BAD = range(4)


def scan_py(data: bytes, pos: int, limits: bytes, inspect: bytes, rows: int) -> tuple[int, int, int, list]:
    """Frame `data` from `pos`: (pos, state, extra, messages). See `_wire.c` for the contract."""
    n = len(data)
    msgs: list = []
    lim = array.array("I", limits)
    run_start = run_end = -1
    state, extra = DONE, 0
    while pos < n:
        if n - pos < 5:
            state = HOLD
            break
        mtype = data[pos]
        (length,) = _unpack_len(data, pos + 1)
        if length < 4 or length > lim[mtype]:
            state, extra = BAD, length
            break
        end = pos + 1 + length
        if inspect[mtype]:
            if end > n:
                state = HOLD
                break
            if mtype == rows:
                if run_start >= 0 and run_end == pos:
                    run_end = end
                else:
                    if run_start >= 0:
                        msgs.append((rows | ROWS, run_end, run_start))
                    run_start, run_end = pos, end
            else:
                if run_start >= 0:
                    msgs.append((rows | ROWS, run_end, run_start))
                    run_start = -1
                msgs.append((mtype, data[pos + 5 : end], pos))
        elif end > n:
            state, extra, pos = SKIP, end - n, n
            break
        pos = end
    if run_start >= 0:
        msgs.append((rows | ROWS, run_end, run_start))
    return pos, state, extra, msgs


def blank_py(n: int) -> bytearray:
    return bytearray(n)


def fill_py(dst: bytearray, at: int, src: bytes | memoryview) -> None:
    if at < 0 or at + len(src) > len(dst):
        raise ValueError("fill past the end")
    dst[at:at + len(src)] = src


try:
    from ._wire import blank, fill, scan
except ImportError:  # built without a C compiler: the same contract, slower
    scan, blank, fill = scan_py, blank_py, fill_py

LARGE = 1 << 20  # bytes of a held message from which it is filled in place as its reads arrive


class Framer:
    __slots__ = ("_inspect", "_allowed", "_small", "_max_inspect", "_max_message", "_limits", "_buf", "_skip",
                 "_limits_raw", "_inspect_raw", "_rows", "_have", "_need", "_large", "_body", "rest")

    def __init__(
        self,
        inspect: bytes,
        *,
        allowed: frozenset[int] | None = None,
        small: dict[int, int] | None = None,
        max_inspect: int = 1 << 20,
        max_message: int = 1 << 30,
        rows: int = 0,
    ) -> None:
        self._inspect = frozenset(inspect)
        self._allowed = allowed
        self._small = small or {}
        self._max_inspect = max_inspect
        self._max_message = max_message
        self._buf: list[bytes] = []  # the reads holding an incomplete message, in order
        self._have = 0  # their total length
        self._need = 0  # the bytes the held message needs in all (5 while its header is incomplete)
        self._large: bytes | bytearray | None = None  # a held LARGE message, filled as its reads arrive
        self._body: bytes | bytearray | None = None  # and its body (None for a type returned in runs)
        self.rest = b""  # what followed a LARGE message in the read that completed it (take_rest)
        self._skip = 0
        # Largest valid length per message type (0: type not allowed), so the hot loop checks with one lookup.
        self._limits = [self._limit(t) for t in range(256)]
        self._limits_raw = array.array("I", self._limits).tobytes()
        self._inspect_raw = bytes(1 if t in self._inspect else 0 for t in range(256))
        # Consecutive whole messages of this type come back as one run: (type | ROWS, end, start).
        self._rows = rows

    def _limit(self, mtype: int) -> int:
        if self._allowed is not None and mtype not in self._allowed:
            return 0
        cap = self._max_inspect if mtype in self._inspect else self._max_message
        return min(cap, self._small.get(mtype, cap))

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        """Return (bytes that may be forwarded now, inspected messages as (type, body, offset)).

        `offset` is where the message starts in the returned bytes, for the rare caller that rewrites one.
        With `rows` set, a run of those messages is one entry (type | ROWS, end, offset).
        """
        if self._large is not None:
            return self._fill(data)
        if self._buf:
            self._buf.append(data)
            self._have += len(data)
            if self._have < self._need:
                return b"", []
            data = b"".join(self._buf)
            self._buf = []
            self._have = 0
        pos = 0
        skip = self._skip
        if skip:
            if skip >= len(data):
                self._skip = skip - len(data)
                return data, []
            pos = skip
            self._skip = 0
        pos, state, extra, msgs = scan(data, pos, self._limits_raw, self._inspect_raw, self._rows)
        if state == HOLD:
            rest = data[pos:] if pos else data
            self._have = len(rest)
            self._need = 1 + _unpack_len(rest, 1)[0] if len(rest) >= 5 else 5
            if self._need >= LARGE:
                self._start_large(rest)
            else:
                self._buf = [rest]
            return data[:pos], msgs
        if state == SKIP:
            self._skip = extra
        elif state == BAD:
            self._check(data[pos], extra)
            raise ProtocolViolation(f"invalid message length {extra} for message type {chr(data[pos])!r}")
        return data, msgs

    def _start_large(self, rest: bytes) -> None:
        self._large = blank(self._need)
        fill(self._large, 0, rest)
        if rest[0] != self._rows:
            self._body = blank(self._need - 5)
            fill(self._body, 0, memoryview(rest)[5:])

    def _fill(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        large, body, have = self._large, self._body, self._have
        assert large is not None
        take = min(self._need - have, len(data))
        piece = memoryview(data)[:take]
        fill(large, have, piece)
        if body is not None:
            fill(body, have - 5, piece)
        self._have = have + take
        if self._have < self._need:
            return b"", []
        self._large = self._body = None
        self._have = 0
        self.rest = data[take:] if take < len(data) else b""
        msg = large if isinstance(large, bytes) else bytes(large)  # a bytearray only without the C module
        if body is None:  # a run of one message of the `rows` type
            return msg, [(self._rows | ROWS, len(msg), 0)]
        return msg, [(msg[0], body if isinstance(body, bytes) else bytes(body), 0)]

    def take_rest(self) -> bytes:
        """What followed a LARGE message in the read that completed it (b"" if nothing): the caller feeds it
        next, once it has dealt with what `feed` returned. Not fed here, so that the message is forwarded
        as it was filled, with no copy to put it in front of what followed it."""
        rest, self.rest = self.rest, b""
        return rest

    def _check(self, mtype: int, length: int) -> None:
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(mtype)!r}")
        if self._allowed is not None and mtype not in self._allowed:
            raise ProtocolViolation(f"unexpected message type {chr(mtype)!r} (0x{mtype:02x})")
        limit = self._small.get(mtype)
        if limit is not None and length > limit:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(mtype)!r}")
        cap = self._limits[mtype]
        if length > cap:
            raise ProtocolViolation(
                f"message of type {chr(mtype)!r} is {length} bytes, over the gateway's limit of {cap}"
            )

    def clear(self) -> None:
        """Drop a held incomplete message (the session has ended)."""
        self._buf = []
        self._large = self._body = None
        self.rest = b""
        self._have = 0

    @property
    def incomplete(self) -> int:
        """Bytes the held message still lacks (0 when none is held, or its header is not complete)."""
        held = self._buf or self._large is not None
        return self._need - self._have if held and self._need > 5 else 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a message (a LARGE one is held twice: message and body)."""
        return 2 * self._have if self._body is not None else self._have
