"""Verification of OAuth 2.1 / OIDC access tokens (JWT) against an issuer's published keys.

Discovery and the JWKS are fetched with httpx, cached, and refetched when a token names an unknown
key id (at most once per `REFETCH_INTERVAL`). Verification is synchronous and may fetch: callers
on the event loop run it in a thread. Verified tokens are cached until they expire.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import OrderedDict
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..config import ALLOWED_ALGORITHMS, IdentityProviderSpec
from ..domain import Identity
from ..names import MAX_NAME, valid_agent_name, valid_person_name, valid_service_name
from . import AuthenticationError

REFETCH_INTERVAL = 30.0


def _b64json(segment: str) -> dict[str, Any]:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError as exc:
        raise AuthenticationError("the token is not a well-formed JWT") from exc


class Provider:
    def __init__(self, settings: IdentityProviderSpec, http: httpx.Client | None = None) -> None:
        self.settings = settings
        self._http = http or httpx.Client(timeout=10.0)
        self._keys: KeySet | None = None
        self._kids: set[str] = set()
        self._fetched_at = 0.0
        self._lock = threading.Lock()
        self.metadata: dict[str, Any] = {}

    def discover(self) -> dict[str, Any]:
        if not self.metadata:
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            r = self._http.get(url)
            r.raise_for_status()
            meta = r.json()
            if meta.get("issuer") != self.settings.issuer:
                raise AuthenticationError(f"identity provider {self.settings.name!r}: discovery names issuer {meta.get('issuer')!r}")
            self.metadata = meta
        return self.metadata

    def _fetch_keys(self) -> None:
        r = self._http.get(self.discover()["jwks_uri"])
        r.raise_for_status()
        data = r.json()
        public = [{k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")} for key in data.get("keys", [])]
        self._keys = KeySet.import_key_set({"keys": public})
        self._kids = {k.get("kid") for k in public if k.get("kid")}
        self._fetched_at = time.monotonic()

    def keys_for(self, kid: str | None) -> KeySet:
        with self._lock:
            stale = self._keys is None or (kid is not None and kid not in self._kids)
            if stale and (self._keys is None or time.monotonic() - self._fetched_at > REFETCH_INTERVAL):
                try:
                    self._fetch_keys()
                except (httpx.HTTPError, ValueError) as exc:
                    raise AuthenticationError(f"cannot fetch the signing keys of {self.settings.name!r}: {exc}") from exc
            if kid is not None and kid not in self._kids:
                raise AuthenticationError("the token is signed with a key the identity provider does not publish")
            assert self._keys is not None
            return self._keys

    def verify(self, token: str, header: dict[str, Any], audience: str | None = None) -> dict[str, Any]:
        s = self.settings
        keys = self.keys_for(header.get("kid"))
        try:
            decoded = jwt.decode(token, keys, algorithms=s.algorithms)
        except JoseError as exc:
            raise AuthenticationError(f"the token's signature does not verify ({exc.error})") from exc
        registry = jwt.JWTClaimsRegistry(
            leeway=s.leeway,
            iss={"essential": True, "value": s.issuer},
            aud={"essential": True, "value": audience or s.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise AuthenticationError(f"the token is not valid here: {exc.description or exc.error}") from exc
        return decoded.claims

    def identity(self, claims: dict[str, Any]) -> Identity:
        """The identity a verified token names. The person is keyed by (issuer, `subject_claim`); the
        name is a label the store checks belongs to that key (store.ensure_user)."""
        s = self.settings
        raw_groups = claims.get(s.groups_claim, [])
        if isinstance(raw_groups, str):
            raw_groups = raw_groups.split()
        if not isinstance(raw_groups, list):
            raise AuthenticationError(f"the token's {s.groups_claim!r} claim is not a list of groups")
        groups = tuple(sorted({s.group_map.get(g, g) for g in raw_groups if isinstance(g, str)}))
        subject = claims.get(s.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError(f"the token has no {s.subject_claim!r} claim naming its subject")
        name = claims.get(s.user_claim) or subject
        if not isinstance(name, str):
            raise AuthenticationError(f"the token's {s.user_claim!r} claim is not a name")
        kind = "service" if claims.get("client_id") and claims.get("sub") == claims.get("client_id") else "user"
        if kind == "service":
            name = f"svc:{name}"  # machines have their own namespace: never a person's name
            if not valid_service_name(name):
                raise AuthenticationError(f"the token names the service client {name!r}, which is not a valid service "
                                          f"name here (ASCII letters, digits, '.', '_', '-'; at most {MAX_NAME - 4})")
        elif not valid_person_name(name):
            raise AuthenticationError(f"the token names the user {name!r}, which is not a valid user name here "
                                      f"(no ':', '/', '#', spaces or control characters; at most {MAX_NAME} characters)")
        expires = float(claims["exp"])
        if "act" in claims:
            # RFC 8693: `sub` is the person, `act.sub` the party acting for them. Anything else in `act` is
            # refused, not read as "no agent": the token says someone acts, and we cannot say who.
            act = claims["act"]
            if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not valid_agent_name(act["sub"]):
                raise AuthenticationError("the token's act claim is malformed: it must be an object naming the acting "
                                          f"party in act.sub (printable, at most {MAX_NAME} characters)")
            if "act" in act:
                # A chain (an agent acting for an agent): the records could name only one of them.
                raise AuthenticationError("the token's act claim is nested (act.act); one acting party is supported")
            if kind == "service":
                raise AuthenticationError("the token says an agent acts for a service client; agents act for people")
            return Identity(name, groups, "agent", act["sub"], f"oidc:{s.name}", expires, subject=subject)
        return Identity(name, groups, kind, None, f"oidc:{s.name}", expires, subject=subject)


MAX_TOKEN = 16 * 1024  # decoded, verified and cached only below this size


class TokenVerifier:
    """Verifies bearer tokens from any configured provider (chosen by the token's `iss`)."""

    def __init__(self, providers: list[Provider], cache_size: int = 4096) -> None:
        self.providers = {p.settings.issuer: p for p in providers}
        self._cache: OrderedDict[tuple[str, str], Identity] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def verify(self, token: str, audience: str | None = None) -> Identity:
        """`audience`: the one the token must carry, when not the provider's own (the MCP resource URL)."""
        if len(token) > MAX_TOKEN:
            raise AuthenticationError(f"the token is longer than {MAX_TOKEN // 1024} KiB; no provider issues such tokens")
        now = time.time()
        key = (audience or "", token)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and (hit.expires_at or 0) > now:
                self._cache.move_to_end(key)
                return hit
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthenticationError("the token is not a JWT (expected three dot-separated parts)")
        header, payload = _b64json(parts[0]), _b64json(parts[1])
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise AuthenticationError(f"token algorithm {header.get('alg')!r} is not accepted; use RS256, ES256 or EdDSA")
        provider = self.providers.get(payload.get("iss"))
        if provider is None:
            raise AuthenticationError(f"tokens from issuer {payload.get('iss')!r} are not accepted here")
        if header["alg"] not in provider.settings.algorithms:
            raise AuthenticationError(f"token algorithm {header['alg']!r} is not accepted for {provider.settings.name!r}")
        identity = provider.identity(provider.verify(token, header, audience))
        with self._lock:
            self._cache[key] = identity
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity
