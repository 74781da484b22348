"""SCRAM-SHA-256: our server and client agree, and wrong proofs fail."""

from __future__ import annotations

import os

import pytest

from wardgate.engines.postgres.scram import ScramClient, ScramError, ScramServer, make_verifier, md5_password


def exchange(password: str, verifiers: list) -> object:  # noqa: ANN001
    salt = verifiers[0][1].salt
    client = ScramClient(password)
    server = ScramServer(salt, 4096)
    server_first = server.client_first(client.client_first())
    key, final = server.client_final(client.server_first(server_first), verifiers)
    client.server_final(final)
    return key


def test_matches_the_right_credential_among_several() -> None:
    salt = os.urandom(16)
    verifiers = [(f"c{i}", make_verifier(f"secret-{i}", salt)) for i in range(3)]
    assert exchange("secret-1", verifiers) == "c1"
    assert exchange("secret-2", verifiers) == "c2"


def test_wrong_password_fails() -> None:
    salt = os.urandom(16)
    with pytest.raises(ScramError, match="password authentication failed"):
        exchange("nope", [("c0", make_verifier("secret", salt))])


def test_tampered_nonce_fails() -> None:
    salt = os.urandom(16)
    client = ScramClient("secret")
    server = ScramServer(salt)
    server.client_first(client.client_first())
    forged = ScramClient("secret")
    with pytest.raises(ScramError):
        # a final message computed for another exchange
        other = ScramServer(salt)
        forged_final = forged.server_first(other.client_first(forged.client_first()))
        server.client_final(forged_final, [("c", make_verifier("secret", salt))])


def test_client_rejects_a_server_that_does_not_know_the_password() -> None:
    salt = os.urandom(16)
    client = ScramClient("secret")
    server = ScramServer(salt)
    final_from_client = client.server_first(server.client_first(client.client_first()))
    with pytest.raises(ScramError):
        client.server_final(b"v=" + b"A" * 44)
    assert final_from_client


def test_md5_answer_matches_postgres_formula() -> None:
    # md5(md5(password || user) || salt), as PostgreSQL documents it
    assert md5_password("u", "p", b"\x00\x01\x02\x03").startswith(b"md5") and len(md5_password("u", "p", b"abcd")) == 35


@pytest.mark.parametrize("final", ["c=\u0080,r=x,p=AAAA", "c=biws,r=\u00e9\u00e9,p=AAAA"])
def test_non_ascii_binding_or_nonce_is_a_clean_failure(final: str) -> None:
    """Found by fuzzing: comparing non-ASCII text raised TypeError instead of refusing the exchange."""
    salt = os.urandom(16)
    server = ScramServer(salt)
    server.client_first(b"n,,n=,r=abc")
    with pytest.raises(ScramError):
        server.client_final(final.encode(), [("c", make_verifier("secret", salt))])


def test_client_rejects_a_server_signature_that_is_not_base64() -> None:
    client = ScramClient("secret")
    server = ScramServer(os.urandom(16))
    client.server_first(server.client_first(client.client_first()))
    with pytest.raises(ScramError, match="malformed"):
        client.server_final(b"v=not base64!")
