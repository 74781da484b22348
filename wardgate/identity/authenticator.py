"""One place that turns a presented bearer secret (OIDC access token or API key) into an Identity."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from ..config import Settings, parse_duration
from ..domain import Identity
from ..store import API_KEY_PREFIX, NotFound, Refused, Store
from . import AuthenticationError, LockedOut
from .oidc import Provider, TokenVerifier
from .throttle import Throttle, lockout_message


class Authenticator:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self.tokens = TokenVerifier([Provider(p) for p in settings.identity_providers])
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        # API keys guessed from one address: locked out per (address, key id) after a few failures.
        self.throttle = Throttle()
        # An agent key acting for a person of an IdP works only while the IdP confirmed the person (a
        # token of theirs seen) this recently: its groups are the ones the IdP last gave.
        self.agent_recheck = parse_duration(settings.credentials.agent_recheck)

    SEEN = 10_000

    def first_use(self, bearer: str) -> bool:
        """Whether this process sees this token or key for the first time (a successful sign-in is
        recorded once per credential, not on every request)."""
        digest = hashlib.sha256(bearer.strip().encode()).digest()
        with self._seen_lock:
            if digest in self._seen:
                self._seen.move_to_end(digest)
                return False
            self._seen[digest] = None
            if len(self._seen) > self.SEEN:
                self._seen.popitem(last=False)
            return True

    def authenticate(self, bearer: str, audience: str | None = None, addr: str | None = None) -> Identity:
        """Blocking (store look-ups, JWKS fetches): call it from a thread, not the event loop.
        `audience`: the audience a token must carry, when not the provider's (the MCP resource URL).
        `addr`: the caller's address; API keys that keep failing from it are locked out (LockedOut).
        Tokens are not: a signature cannot be guessed, and nothing is looked up for a bad one."""
        bearer = bearer.strip()
        if not bearer:
            raise AuthenticationError("no credentials: send `Authorization: Bearer <token or API key>`")
        if bearer.startswith(API_KEY_PREFIX):
            key = (addr, bearer[len(API_KEY_PREFIX):].split("_", 1)[0][:64])
            if addr is not None and (wait := self.throttle.wait(key)) > 0:
                raise LockedOut(lockout_message(wait) + " for this API key", wait)
            try:
                row, groups, user = self.store.api_key(bearer, confirm_within=self.agent_recheck)
            except NotFound as exc:
                if addr is not None:
                    self.throttle.failed(key)
                raise AuthenticationError(str(exc)) from None
            self.throttle.succeeded(key)
            if row.kind == "agent":
                return Identity(user.name, tuple(groups), "agent", row.agent, f"apikey:{row.id}", row.expires_at,
                                uid=user.uid)
            return Identity(user.name, tuple(groups), "service", None, f"apikey:{row.id}", row.expires_at, uid=user.uid)
        if not self.tokens.providers:
            raise AuthenticationError("no identity provider is configured: use an API key, or add [[identity_providers]]")
        identity = self.tokens.verify(bearer, audience)
        # Keyed by (provider, subject): a provider's "alice" is not the gateway's local user alice, nor
        # another subject who took that name, and a removed identity stays refused.
        try:
            return self.store.resolve(identity)
        except Refused as exc:
            raise AuthenticationError(f"{exc}; ask an administrator") from None
