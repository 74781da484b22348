"""asyncio protocol shared by both sides of a session.

During the handshake it buffers bytes and lets a coroutine await whole messages; once the session
is established, each read goes straight to the relay's callback (no queues, no copies).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from .codec import MessageReader, StartupPacket

# Held back during the handshake before reading pauses; the handshake needs only small messages.
HANDSHAKE_BUFFER_LIMIT = 1 << 20


class PeerClosed(ConnectionError):
    pass


class StreamProtocol(asyncio.Protocol):
    def __init__(self, max_message: int = 1 << 20) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = MessageReader(max_message)
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_pause: Callable[[bool], None] | None = None
        self.closed = False
        self.close_exc: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.tls = False

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self.reader.feed(data)
        if len(self.reader) > HANDSHAKE_BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.close_exc = exc
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(True)

    def resume_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause(False)

    # -- handshake helpers

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise PeerClosed("the peer closed the connection")
        if self.transport is not None:
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self.reader.next()
            if msg is not None:
                return msg
            await self._wait()

    async def read_startup(self) -> StartupPacket:
        while True:
            packet = self.reader.take_startup()
            if packet is not None:
                return packet
            await self._wait()

    async def read_raw(self, n: int) -> bytes:
        while True:
            data = self.reader.take_raw(n)
            if data is not None:
                return data
            await self._wait()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def start_tls(self, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        new = await loop.start_tls(
            self.transport, self, ctx, server_side=server_side, server_hostname=server_hostname, ssl_handshake_timeout=15
        )
        if new is None:
            raise PeerClosed("the peer closed the connection during the TLS handshake")
        self.transport = new  # type: ignore[assignment]
        self.tls = True

    def start_relay(self, on_data: Callable[[bytes], None]) -> None:
        """Hand every further read to `on_data`, starting with what the handshake left unread."""
        leftover = self.reader.drain()
        self.on_data = on_data
        if self.transport is not None:
            self.transport.resume_reading()
        if leftover:
            on_data(leftover)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
