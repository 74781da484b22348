"""Signing people in with the organisation's IdP from the command line, and keeping their tokens.

Authorization code + PKCE with a loopback redirect (RFC 8252), or the device authorization grant
(RFC 8628). Tokens are kept in the user's config directory with mode 0600 and refreshed before
they expire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx

from ..config import IdentityProviderSpec
from . import AuthenticationError

REFRESH_MARGIN = 60.0


def token_file() -> Path:
    base = os.environ.get("WARDGATE_TOKEN_FILE")
    if base:
        return Path(base)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "wardgate" / "tokens.json"


def _discover(http: httpx.Client, spec: IdentityProviderSpec) -> dict[str, Any]:
    r = http.get(spec.issuer.rstrip("/") + "/.well-known/openid-configuration")
    r.raise_for_status()
    return r.json()


def _token_request(http: httpx.Client, endpoint: str, data: dict[str, str]) -> dict[str, Any]:
    r = http.post(endpoint, data=data)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code >= 400:
        raise AuthenticationError(f"the identity provider refused: {body.get('error_description') or body.get('error') or r.text}")
    return body


class _Callback(BaseHTTPRequestHandler):
    result: dict[str, str] = {}
    done = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urllib.parse.urlparse(self.path)
        if url.path != "/callback":
            self.send_error(404)
            return
        type(self).result = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        ok = "code" in self.result
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        self.wfile.write(b"Signed in to Wardgate; you can close this window.\n" if ok else b"Sign-in failed.\n")
        type(self).done.set()

    def log_message(self, *args: Any) -> None:
        pass


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge) for an authorization code flow with PKCE."""
    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def authorization_url(meta: dict[str, Any], spec: IdentityProviderSpec, redirect_uri: str, challenge: str, state: str,
                      prompt: str = "consent") -> str:
    query = {
        "response_type": "code", "client_id": spec.client_id, "redirect_uri": redirect_uri,
        "scope": "openid profile offline_access", "code_challenge": challenge, "code_challenge_method": "S256",
        "state": state, "resource": spec.audience, "prompt": prompt,
    }
    return meta["authorization_endpoint"] + "?" + urllib.parse.urlencode(query)


def exchange_code(http: httpx.Client, meta: dict[str, Any], spec: IdentityProviderSpec, code: str, redirect_uri: str,
                  verifier: str) -> dict[str, Any]:
    return _token_request(http, meta["token_endpoint"], {
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
        "client_id": spec.client_id, "code_verifier": verifier, "resource": spec.audience,
    })


def login_pkce(spec: IdentityProviderSpec, show_url: Callable[[str], None], timeout: float = 300.0) -> dict[str, Any]:
    """Run the authorization code flow with PKCE through a loopback redirect; return the token response."""
    if not spec.client_id:
        raise AuthenticationError(f"identity provider {spec.name!r} has no client_id for command-line sign-in")
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    handler = type("Callback", (_Callback,), {"result": {}, "done": threading.Event()})
    server = HTTPServer(("127.0.0.1", 0), handler)
    redirect_uri = f"http://127.0.0.1:{server.server_port}/callback"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=30) as http:
            meta = _discover(http, spec)
            show_url(authorization_url(meta, spec, redirect_uri, challenge, state))
            if not handler.done.wait(timeout):
                raise AuthenticationError("sign-in timed out: no answer came back to the loopback redirect")
            result = handler.result
            if result.get("state") != state:
                raise AuthenticationError("sign-in answer has the wrong state; try again")
            if "code" not in result:
                raise AuthenticationError(f"sign-in failed: {result.get('error_description') or result.get('error')}")
            tokens = exchange_code(http, meta, spec, result["code"], redirect_uri, verifier)
            return _with_meta(tokens, spec, meta)
    finally:
        server.shutdown()
        server.server_close()


def login_device(spec: IdentityProviderSpec, show: Callable[[str, str], None], timeout: float = 600.0) -> dict[str, Any]:
    """Run the device authorization grant: show a code and URL, poll until the person approves."""
    with httpx.Client(timeout=30) as http:
        meta = _discover(http, spec)
        endpoint = meta.get("device_authorization_endpoint")
        if not endpoint:
            raise AuthenticationError(f"identity provider {spec.name!r} does not offer the device flow; sign in without --device")
        start = _token_request(http, endpoint, {"client_id": spec.client_id, "scope": "openid profile offline_access",
                                                "resource": spec.audience})
        show(start.get("verification_uri_complete") or start["verification_uri"], start["user_code"])
        interval = float(start.get("interval", 5))
        deadline = time.monotonic() + min(timeout, float(start.get("expires_in", timeout)))
        while time.monotonic() < deadline:
            time.sleep(interval)
            r = http.post(meta["token_endpoint"], data={
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": start["device_code"],
                "client_id": spec.client_id, "resource": spec.audience,
            })
            body = r.json()
            if r.status_code == 200:
                return _with_meta(body, spec, meta)
            if body.get("error") == "slow_down":
                interval += 5
            elif body.get("error") != "authorization_pending":
                raise AuthenticationError(f"sign-in failed: {body.get('error_description') or body.get('error')}")
        raise AuthenticationError("sign-in timed out before it was approved")


def _with_meta(tokens: dict[str, Any], spec: IdentityProviderSpec, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "provider": spec.name, "issuer": spec.issuer, "audience": spec.audience, "client_id": spec.client_id,
        "token_endpoint": meta["token_endpoint"], "access_token": tokens["access_token"],
        "refresh_token": tokens.get("refresh_token"), "expires_at": time.time() + float(tokens.get("expires_in", 300)),
    }


def save(tokens: dict[str, Any], path: Path | None = None) -> Path:
    path = path or token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(tokens, fh)
    os.replace(tmp, path)
    return path


def load(path: Path | None = None) -> dict[str, Any] | None:
    path = path or token_file()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def current_access_token(path: Path | None = None, *, force_refresh: bool = False) -> str | None:
    """The stored access token, refreshed first when it is about to expire (or always, with
    `force_refresh`, which asks the IdP whether the sign-in still holds). None when not signed in."""
    tokens = load(path)
    if tokens is None:
        return None
    if not force_refresh and tokens["expires_at"] - REFRESH_MARGIN > time.time():
        return tokens["access_token"]
    if not tokens.get("refresh_token"):
        raise AuthenticationError("your sign-in has expired; run `wardgate login` again")
    with httpx.Client(timeout=30) as http:
        try:
            fresh = _token_request(http, tokens["token_endpoint"], {
                "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": tokens["client_id"],
                "resource": tokens["audience"],
            })
        except AuthenticationError as exc:
            raise AuthenticationError(f"{exc}; run `wardgate login` again") from None
    tokens.update(access_token=fresh["access_token"], refresh_token=fresh.get("refresh_token", tokens["refresh_token"]),
                  expires_at=time.time() + float(fresh.get("expires_in", 300)))
    save(tokens, path)
    return tokens["access_token"]
