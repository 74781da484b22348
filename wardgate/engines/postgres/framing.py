"""Zero-copy framing of an established session's byte stream.

A `Framer` finds message boundaries in what one read returned. Messages of the types it was told
to inspect are returned whole (buffered across reads, bounded); every other message streams
through as it arrives, so a 1 GB DataRow or CopyData never sits in memory. When a read is consumed
whole, the read's own buffer is forwarded unchanged.
"""

from __future__ import annotations

import struct

from .codec import ProtocolViolation

_U32 = struct.Struct("!I")
_unpack_len = _U32.unpack_from


class Framer:
    __slots__ = ("_inspect", "_allowed", "_small", "_max_inspect", "_max_message", "_limits", "_buf", "_skip")

    def __init__(
        self,
        inspect: bytes,
        *,
        allowed: frozenset[int] | None = None,
        small: dict[int, int] | None = None,
        max_inspect: int = 1 << 20,
        max_message: int = 1 << 30,
    ) -> None:
        self._inspect = frozenset(inspect)
        self._allowed = allowed
        self._small = small or {}
        self._max_inspect = max_inspect
        self._max_message = max_message
        self._buf = b""
        self._skip = 0
        # Largest valid length per message type (0: type not allowed), so the hot loop checks with one lookup.
        self._limits = [self._limit(t) for t in range(256)]

    def _limit(self, mtype: int) -> int:
        if self._allowed is not None and mtype not in self._allowed:
            return 0
        cap = self._max_inspect if mtype in self._inspect else self._max_message
        return min(cap, self._small.get(mtype, cap))

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
        """Return (bytes that may be forwarded now, inspected messages as (type, body, offset)).

        `offset` is where the message starts in the returned bytes, for the rare caller that rewrites one.
        """
        if self._buf:
            data = self._buf + data
            self._buf = b""
        n = len(data)
        msgs: list[tuple[int, bytes, int]] = []
        pos = 0
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                return data, msgs
            pos = skip
            self._skip = 0
        inspect = self._inspect
        limits = self._limits
        while pos < n:
            if n - pos < 5:
                self._buf = data[pos:]
                break
            mtype = data[pos]
            (length,) = _unpack_len(data, pos + 1)
            if length < 4 or length > limits[mtype]:
                self._check(mtype, length)
            end = pos + 1 + length
            if mtype in inspect:
                if end > n:
                    self._buf = data[pos:]
                    break
                msgs.append((mtype, data[pos + 5 : end], pos))
            elif end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        if self._buf:
            return data[:pos], msgs
        return data, msgs

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

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a message."""
        return len(self._buf)
