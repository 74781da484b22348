"""Who is calling: OIDC access tokens, API keys, native credentials."""


class AuthenticationError(Exception):
    """The presented token or key cannot be accepted. The message says why and what to do."""
