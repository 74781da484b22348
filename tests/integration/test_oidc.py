"""Access tokens from a real OpenID provider: accepted when valid, refused for every forged variant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from tests.conftest import IDP_AUDIENCE
from wardgate.config import IdentityProviderSpec
from wardgate.identity import AuthenticationError
from wardgate.identity.oidc import Provider, TokenVerifier


@pytest.fixture
def verifier(idp) -> TokenVerifier:  # noqa: ANN001
    spec = IdentityProviderSpec(name="test", issuer=idp.issuer, audience=IDP_AUDIENCE, group_map={"auditors": "audit"})
    return TokenVerifier([Provider(spec)])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_client_credentials_token_is_a_service_identity(idp, verifier) -> None:
    ident = verifier.verify(idp.client_credentials())
    assert (ident.user, ident.groups, ident.kind, ident.agent) == ("svc:ci-bot", ("deployers",), "service", None)
    assert ident.source == "oidc:test" and ident.expires_at > time.time()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_user_token_with_groups_and_mapping(idp, verifier, alg) -> None:
    token = idp.forge(idp.claims(sub="olivia", preferred_username="olivia", groups=["ops", "auditors"]), alg=alg)
    ident = verifier.verify(token)
    assert (ident.user, ident.groups, ident.kind) == ("olivia", ("audit", "ops"), "user")


def test_actor_claim_makes_an_agent_acting_for_the_user(idp, verifier) -> None:
    ident = verifier.verify(idp.forge(idp.claims(act={"sub": "claude-code"})))
    assert (ident.user, ident.agent, ident.kind, ident.groups) == ("alice", "claude-code", "agent", ("dev",))
    assert ident.display == "claude-code acting for alice"


def deny(verifier, token: str, match: str) -> None:  # noqa: ANN001
    with pytest.raises(AuthenticationError, match=match):
        verifier.verify(token)


def test_expired_token(idp, verifier) -> None:
    now = int(time.time())
    deny(verifier, idp.forge(idp.claims(iat=now - 900, exp=now - 600)), "expired")


def test_token_not_yet_valid(idp, verifier) -> None:
    deny(verifier, idp.forge(idp.claims(nbf=int(time.time()) + 600)), "not valid here")


def test_wrong_audience(idp, verifier) -> None:
    deny(verifier, idp.forge(idp.claims(aud="https://someone-else.example")), "aud")


def test_wrong_issuer(idp, verifier) -> None:
    deny(verifier, idp.forge(idp.claims(iss="https://evil.example")), "not accepted here")


def test_unknown_kid(idp, verifier) -> None:
    other = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)).as_dict(private=True)
    deny(verifier, idp.forge(idp.claims(), key={**other, "alg": "RS256", "kid": "not-published"}), "does not publish")


def test_key_not_of_the_provider_with_a_published_kid(idp, verifier) -> None:
    other = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048)).as_dict(private=True)
    real_kid = next(k["kid"] for k in idp.private_keys if k["alg"] == "RS256")
    deny(verifier, idp.forge(idp.claims(), key={**other, "alg": "RS256"}, kid=real_kid), "signature")


def test_alg_none(idp, verifier) -> None:
    token = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(idp.claims()).encode())}."
    deny(verifier, token, "not accepted")


def test_hs256_signed_with_the_public_key(idp, verifier) -> None:
    from joserfc.jwk import KeySet

    public = KeySet.import_key_set({"keys": [k for k in idp.private_keys if k["alg"] == "RS256"]}).keys[0]
    pem = public.as_pem(private=False)
    head = _b64(json.dumps({"alg": "HS256", "kid": public.kid}).encode())
    body = _b64(json.dumps(idp.claims()).encode())
    sig = _b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    deny(verifier, f"{head}.{body}.{sig}", "not accepted")


def test_tampered_payload(idp, verifier) -> None:
    token = idp.client_credentials()
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["groups"] = ["admin"]
    deny(verifier, f"{head}.{_b64(json.dumps(claims).encode())}.{sig}", "signature")


def test_garbage(verifier) -> None:
    deny(verifier, "not-a-token", "not a JWT")
    deny(verifier, "a.b.c", "well-formed")


def test_oversized_token(idp, verifier) -> None:
    """A token padded with a huge claim (a real signature over it) is refused before any decoding."""
    claims = idp.claims(padding="x" * 20_000)
    deny(verifier, idp.forge(claims), "longer than 16 KiB")
    assert verifier.verify(idp.forge(idp.claims())).user  # a normal one from the same provider still passes
