"""Secrets never land in the store in clear: header values and query values are replaced by a short
fingerprint.

What counts as a secret goes by the words of a name, so that keys under any vendor's header
(``x-goog-api-key``, ``X-Auth-Token``) or query parameter (``?key=``, ``?access_token=``, ``apiKey``) are
covered, not a fixed list, while ``max_tokens`` or ``author`` are not. A harmless field named like a
credential (an idempotency key) is fingerprinted too: the fingerprint still tells values apart.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from urllib.parse import unquote

SECRET_WORDS = frozenset({
    "key", "apikey", "token", "secret", "password", "passwd", "auth", "authorization", "credential",
    "credentials", "signature", "sig", "cookie", "session", "sessionid", "jwt", "bearer",
    "accesstoken", "refreshtoken", "csrftoken", "privatekey", "clientsecret",  # written as one word
})
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


@functools.lru_cache(maxsize=1024)
def is_secret_name(name: str) -> bool:
    """True for a header or query parameter name one of whose words names a credential."""
    return not SECRET_WORDS.isdisjoint(_WORD.findall(_CAMEL.sub(r"\1_\2", name).lower()))


def fingerprint(value: str) -> str:
    """A short, stable fingerprint that tells keys apart without revealing them."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def redact_value(value: str) -> str:
    """``Bearer sk-abc`` becomes ``Bearer <redacted sha256:…>``; the auth scheme stays readable."""
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.isalpha() and rest:
        return f"{scheme} <redacted sha256:{fingerprint(rest)}>"
    return f"<redacted sha256:{fingerprint(value)}>"


def redacted_query_value(value: str) -> str:
    """The stand-in for a secret query value: URL-safe, so a stored URL stays a valid request target."""
    return f"redacted-sha256-{fingerprint(unquote(value))}"


def redact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the headers with every secret value redacted."""
    return [(k, redact_value(v) if is_secret_name(k) else v) for k, v in headers]


def redact_query(target: str) -> str:
    """A URL or path with the values of secret-named query parameters redacted."""
    head, sep, query = target.partition("?")
    if not sep:
        return target
    query, hash_sep, fragment = query.partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if eq and value and is_secret_name(unquote(name)):
            part = f"{name}={redacted_query_value(value)}"
        parts.append(part)
    return head + sep + "&".join(parts) + hash_sep + fragment


def new_token() -> str:
    """A fresh agent token for proxy credentials."""
    return secrets.token_urlsafe(18)


def hash_token(token: str) -> str:
    """What the store keeps of an agent token: enough to check it, not to reuse it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time check of a presented token against the stored hash."""
    return token_hash is not None and hmac.compare_digest(hash_token(token), token_hash)
