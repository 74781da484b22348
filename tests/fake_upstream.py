"""A fake PostgreSQL server for the gateway's upstream side: it reads the startup message, asks for a
cleartext (3) or md5 (5) password, and records every password message it is sent."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from pathlib import Path

SSL_REQUEST = 80877103
MD5_SALT = b"s4lt"


def _exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


class FakeUpstream:
    def __init__(self, method: int = 3, tls: tuple[Path, Path] | None = None) -> None:
        self.method = method
        self.ctx = None
        if tls is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        self.received: list[bytes] = []  # bodies of the password messages, as sent
        self.connections = 0  # startups read
        self._handled = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        started = False
        try:
            while True:
                (length,) = struct.unpack("!I", _exact(conn, 4))
                body = _exact(conn, length - 4)
                if struct.unpack("!I", body[:4])[0] != SSL_REQUEST:
                    break
                if self.ctx is None:
                    conn.sendall(b"N")
                else:
                    conn.sendall(b"S")
                    conn = self.ctx.wrap_socket(conn, server_side=True)
            started = True
            with self._lock:
                self.connections += 1
            if self.method == 5:
                conn.sendall(b"R" + struct.pack("!II", 12, 5) + MD5_SALT)
            else:
                conn.sendall(b"R" + struct.pack("!II", 8, 3))
            kind = _exact(conn, 1)
            (length,) = struct.unpack("!I", _exact(conn, 4))
            body = _exact(conn, length - 4)
            if kind == b"p":
                with self._lock:
                    self.received.append(body)
            error = b"SFATAL\x00C28P01\x00Mpassword authentication failed (fake server)\x00\x00"
            conn.sendall(b"E" + struct.pack("!I", len(error) + 4) + error)
        except (EOFError, OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
            if started:
                with self._lock:
                    self._handled += 1

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every connection that started has been served to its end."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if self._handled >= self.connections:
                    return
            time.sleep(0.05)
        raise AssertionError("the fake upstream still holds a connection open")

    def close(self) -> None:
        self._stop = True
        self._sock.close()

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
