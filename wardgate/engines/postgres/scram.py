"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it: server and client state machines.

Pure functions over bytes; no I/O. The server side can check one proof against several stored
verifiers that share a salt, so a user may hold more than one live credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .codec import ProtocolViolation

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096


class ScramError(Exception):
    """The exchange failed: wrong proof, or a malformed message."""


@dataclass(frozen=True, slots=True)
class Verifier:
    """What a server stores instead of a password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    # PostgreSQL applies SASLprep; our credentials are ASCII, for which SASLprep is the identity.
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)


def make_verifier(password: str, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    salted = salted_password(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return Verifier(salt, iterations, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key"))


def _attributes(msg: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:16]!r}")
        out[part[0]] = part[2:]
    return out


class ScramServer:
    """Server side. Feed the client-first message, send `server_first`, then check the client-final."""

    def __init__(self, salt: bytes, iterations: int = DEFAULT_ITERATIONS, nonce: str | None = None) -> None:
        self.salt = salt
        self.iterations = iterations
        self._server_nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = ""
        self._server_first = ""
        self._gs2_header = ""
        self._nonce = ""

    def client_first(self, data: bytes) -> bytes:
        try:
            msg = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("SCRAM client-first-message is not UTF-8") from exc
        if msg.startswith("p="):
            raise ScramError("channel binding was requested but is not offered")
        if not (msg.startswith("n,") or msg.startswith("y,")):
            raise ScramError("malformed SCRAM client-first-message")
        head, sep, rest = msg[2:].partition(",")
        if not sep or (head and not head.startswith("a=")):
            raise ScramError("malformed SCRAM client-first-message")
        self._gs2_header = msg[: 2 + len(head) + 1]
        self._client_first_bare = rest
        attrs = _attributes(rest)
        client_nonce = attrs.get("r", "")
        if not client_nonce:
            raise ScramError("SCRAM client-first-message has no nonce")
        self._nonce = client_nonce + self._server_nonce
        salt = base64.b64encode(self.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.iterations}"
        return self._server_first.encode()

    def client_final(self, data: bytes, candidates: list[tuple[object, Verifier]]) -> tuple[object, bytes]:
        """Check the proof against each candidate; return (matching key, server-final message)."""
        try:
            msg = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("SCRAM client-final-message is not UTF-8") from exc
        without_proof, sep, proof_part = msg.rpartition(",p=")
        if not sep:
            raise ScramError("SCRAM client-final-message has no proof")
        attrs = _attributes(without_proof)
        expected_binding = base64.b64encode(self._gs2_header.encode()).decode()
        if not hmac.compare_digest(attrs.get("c", "").encode(), expected_binding.encode()):
            raise ScramError("SCRAM channel binding does not match")
        if not hmac.compare_digest(attrs.get("r", "").encode(), self._nonce.encode()):
            raise ScramError("SCRAM nonce does not match")
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError as exc:
            raise ScramError("SCRAM proof is not base64") from exc
        if len(proof) != 32:
            raise ScramError("SCRAM proof has the wrong length")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        matched = None
        for key, verifier in candidates:
            signature = _hmac(verifier.stored_key, auth_message)
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
            # Every candidate is checked, so timing does not tell which one matched.
            if hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key) and matched is None:
                matched = (key, verifier)
        if matched is None:
            raise ScramError("password authentication failed")
        key, verifier = matched
        server_signature = _hmac(verifier.server_key, auth_message)
        return key, b"v=" + base64.b64encode(server_signature)


class ScramClient:
    """Client side, for the gateway's own connections to upstream servers."""

    def __init__(self, password: str, nonce: str | None = None) -> None:
        self.password = password
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self._client_first_bare).encode()

    def server_first(self, data: bytes) -> bytes:
        server_first = data.decode("utf-8")
        attrs = _attributes(server_first)
        nonce = attrs.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(attrs["s"])
            iterations = int(attrs["i"])
        except (KeyError, ValueError) as exc:
            raise ScramError("malformed SCRAM server-first-message") from exc
        if iterations < 1 or iterations > 10_000_000:
            raise ScramError("SCRAM iteration count out of range")
        salted = salted_password(self.password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first},{without_proof}".encode()
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def server_final(self, data: bytes) -> None:
        attrs = _attributes(data.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"server rejected SCRAM authentication: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            raise ScramError("malformed SCRAM server-final-message") from None
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature does not match: the upstream server is not who it claims")


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The answer to AuthenticationMD5Password: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest().encode()  # noqa: S324 - protocol
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()  # noqa: S324 - protocol
