"""Encryption of secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256), with the key kept apart from the store."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken


class SecretError(Exception):
    pass


class SecretBox:
    def __init__(self, key: str | bytes) -> None:
        self._key = key.encode() if isinstance(key, str) else bytes(key)
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise SecretError(
                "the secret key is not a valid Fernet key (32 url-safe base64 bytes); "
                "generate one with `wardgate admin genkey`"
            ) from exc

    @classmethod
    def from_settings(cls, secret_key: str | None, key_file: Path) -> "SecretBox":
        """Use the configured key, else the key file, creating it (0600) on first start."""
        if secret_key:
            return cls(secret_key)
        if key_file.exists():
            return cls(key_file.read_bytes().strip())
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
        return cls(key)

    def derive(self, label: str) -> bytes:
        """A secret of its own for `label`, derived from the key (never the key itself)."""
        return hmac.new(self._key, b"wardgate:" + label.encode(), hashlib.sha256).digest()

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode("utf-8")
        except InvalidToken as exc:
            raise SecretError("a stored secret cannot be decrypted: the secret key changed or the store was altered") from exc
