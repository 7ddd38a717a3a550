"""Secrets never land in the store in clear: header values are replaced by a short fingerprint."""

from __future__ import annotations

import hashlib
import hmac
import secrets

SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie",
})


def fingerprint(value: str) -> str:
    """A short, stable fingerprint that tells keys apart without revealing them."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def redact_value(value: str) -> str:
    """``Bearer sk-abc`` becomes ``Bearer <redacted sha256:…>``; the auth scheme stays readable."""
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.isalpha() and rest:
        return f"{scheme} <redacted sha256:{fingerprint(rest)}>"
    return f"<redacted sha256:{fingerprint(value)}>"


def redact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the headers with every secret value redacted."""
    return [(k, redact_value(v) if k.lower() in SECRET_HEADERS else v) for k, v in headers]


def new_token() -> str:
    """A fresh agent token for proxy credentials."""
    return secrets.token_urlsafe(18)


def hash_token(token: str) -> str:
    """What the store keeps of an agent token: enough to check it, not to reuse it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time check of a presented token against the stored hash."""
    return token_hash is not None and hmac.compare_digest(hash_token(token), token_hash)
