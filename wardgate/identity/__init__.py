"""Who is calling: OIDC access tokens, API keys, native credentials."""


class AuthenticationError(Exception):
    """The presented token or key cannot be accepted. The message says why and what to do."""


class LockedOut(AuthenticationError):
    """Too many failed attempts from this address: refused unchecked for `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
