"""A deliberately raw PostgreSQL client over a socket, for sending what real drivers never would."""

from __future__ import annotations

import socket
import ssl
import struct

from wardgate.engines.postgres import codec
from wardgate.engines.postgres.scram import MECHANISM, ScramClient


class RawClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = codec.MessageReader(1 << 24)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, n: int) -> bytes:
        return self.sock.recv(n)

    def read(self) -> tuple[str, bytes]:
        while True:
            msg = self.reader.next()
            if msg is not None:
                return chr(msg[0]), msg[1]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.reader.feed(data)

    def read_until(self, mtype: str) -> list[tuple[str, bytes]]:
        out = []
        while True:
            m = self.read()
            out.append(m)
            if m[0] == mtype:
                return out

    def closed(self) -> bool:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def error(self) -> dict[str, str]:
        while True:
            mtype, body = self.read()
            if mtype == "E":
                return codec.parse_error_fields(body)

    def login(self, user: str, password: str, database: str, **params: str) -> list[tuple[str, bytes]]:
        self.send(codec.startup_message({"user": user, "database": database, **params}))
        mtype, body = self.read()
        assert mtype == "R" and struct.unpack("!i", body[:4])[0] == 10, (mtype, body)
        scram = ScramClient(password)
        self.send(codec.sasl_initial_response(MECHANISM, scram.client_first()))
        mtype, body = self.read()
        assert mtype == "R", codec.parse_error_fields(body)
        self.send(codec.password_message(scram.server_first(body[4:])))
        return self.read_until("Z")

    def close(self) -> None:
        self.sock.close()
