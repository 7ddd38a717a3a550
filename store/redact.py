"""Secrets never land in the store in clear: header values and query values are replaced by a short
fingerprint.

What counts as a secret goes by the words of a name, so that keys under any vendor's header
(``x-goog-api-key``, ``X-Auth-Token``, ``HFToken``) or query parameter (``?key=``, ``?access_token=``,
``apiKey``) are covered, not a fixed list, while ``max_tokens`` or ``author`` are not. A harmless field
named like a credential (an idempotency key, a page token) is fingerprinted too: the fingerprint still
tells values apart. OAuth codes (``?code=``, ``?device_code=``) go by the whole name, in URLs only.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
import secrets
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from rollouttap.paths import cache_root

log = logging.getLogger(__name__)

SECRET_WORDS = frozenset({"auth", "authorization", "credential", "credentials", "session", "sessionid", "sig",
                          "jwt", "bearer", "pwd", "jsessionid", "passphrase", "otp", "pass", "passcode", "oauth",
                          "pat", "sid", "sessid", "phpsessid", "pw"})
# Headers whose value holds URLs (``Link: <...?page_token=...>``): their secret query values are redacted too.
URL_HEADERS = frozenset({"referer", "location", "content-location", "link", "refresh"})
# A word ending in one of these is a secret too, written as one word or not: apikey, authtoken, hftoken.
SECRET_ENDINGS = ("key", "token", "secret", "password", "passwd", "cookie", "signature")
# Their plurals (X-Api-Keys, cookies), but not "tokens": max_tokens, x-ratelimit-remaining-tokens are counts.
_PLURAL_ENDINGS = tuple(e + "s" for e in SECRET_ENDINGS if e != "token")
_WORD = re.compile(r"[a-z]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
# Keys under a name with no credential word, by their whole name (lower case, "-" as "_"): OpenWeatherMap's and
# Wolfram|Alpha's ``?appid=`` (the weather tool of function-calling examples), Baidu's ``?ak=``, Honeycomb's
# and JFrog's headers.
KEY_NAMES = frozenset({"appid", "app_id", "ak", "x_honeycomb_team", "x_jfrog_art_api"})
# OAuth authorization and device codes and PKCE verifiers (RFC 6749, 8628, 7636) travel as URL parameters
# named exactly so; "code" as a word of a longer name is a plain field (zipcode, country_code, status_code),
# hence whole names, not words.
OAUTH_CODE_NAMES = frozenset({"code", "device_code", "user_code", "auth_code", "authorization_code", "code_verifier"})


@functools.lru_cache(maxsize=1024)
def is_secret_name(name: str) -> bool:
    """True for a header or query parameter name one of whose words names a credential.

    Words are read twice: split at case changes (``HFToken``, ``apiKey``) and as written, lower-cased: header
    names are case-insensitive, and servers read ``AuthoriZation`` or ``X-Api-KeY`` as the usual ones."""
    return (_has_secret_word(_CAMEL.sub(r"\1_\2", name).lower()) or _has_secret_word(name.lower())
            or name.lower().replace("-", "_") in KEY_NAMES)


def _has_secret_word(text: str) -> bool:
    for word in _WORD.findall(text):
        if word in SECRET_WORDS or word.endswith(SECRET_ENDINGS) or word.endswith(_PLURAL_ENDINGS):
            return True
        if word.startswith("auth") and not word.startswith("author"):  # authentication, authz
            return True
        if word.startswith(("authoriz", "authoris")):  # authorisation, authorized (not author, authority)
            return True
    return False


@functools.lru_cache(maxsize=1024)
def is_secret_param(name: str) -> bool:
    """True for a URL query or path parameter name that holds a secret: a secret name, or an OAuth code's.

    Only URL parameters take the OAuth names: a header or command option named ``code`` is no such convention
    (``--code 'print(1)'`` is a program)."""
    normal = _CAMEL.sub(r"\1_\2", name).lower().replace("-", "_")
    return normal in OAUTH_CODE_NAMES or is_secret_name(name)


def fingerprint(value: str) -> str:
    """A short fingerprint that tells keys apart without revealing them: an HMAC-SHA256 under this machine's
    key, so that a short secret (a password, a one-time code) cannot be found by hashing guesses with
    nothing but the store file."""
    return hmac.new(_machine_key(), value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:12]


@functools.cache
def _machine_key() -> bytes:
    """32 random bytes kept in $ROLLOUTTAP_CACHE/fingerprint.key (made on first use, readable by its owner
    only); every process on the machine fingerprints alike. Where it cannot be kept (a read-only home),
    this process's own random key: its fingerprints then match no other process's, but a secret is never
    stored in clear and no flow is lost over it."""
    try:
        return _stored_key(cache_root() / "fingerprint.key")
    except Exception as exc:  # OSError, or no home directory at all (RuntimeError): never fail a flow
        log.warning("rollouttap: no fingerprint key file (%s); this process uses a key of its own", exc)
        return secrets.token_bytes(32)


def _stored_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    if len(key) >= 32:
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a fresh name, then linked: a process racing this one never reads half a key.
    draft = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
        os.link(draft, path)
    except FileExistsError:  # another process made it first: theirs counts
        pass
    finally:
        draft.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) < 32:  # a damaged file: not a key to hash secrets with
        raise OSError(f"{path} holds {len(key)} bytes, not a key")
    return key


def redact_value(value: str) -> str:
    """``Bearer sk-abc`` becomes ``Bearer <redacted sha256:…>``; the auth scheme stays readable."""
    scheme, sep, rest = value.partition(" ")
    if sep and scheme.isalpha() and rest:
        return f"{scheme} <redacted sha256:{fingerprint(rest)}>"
    return f"<redacted sha256:{fingerprint(value)}>"


def is_redacted(value: str) -> bool:
    """True for a header value ``redact_value`` wrote (under this rule or an older one)."""
    return "<redacted sha256:" in value


def redacted_query_value(value: str) -> str:
    """The stand-in for a secret query value: URL-safe, so a stored URL stays a valid request target."""
    return f"redacted-sha256-{fingerprint(unquote(value))}"


def redact_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return the headers with every secret value redacted, secret query values and URL passwords in URL-valued
    ones, credentials in a WebSocket subprotocol list, and in any header agent tokens, URL passwords and tokens
    given as a URL's user (``hide_agent_tokens``: ``Referer: http://127.0.0.1:PORT/agents/ID/TOKEN/v1/``,
    ``X-Upstream: http://ID:TOKEN@host``, ``X-Repo: https://ghp_…@github.com/o``)."""
    return [(k, redact_value(v) if is_secret_name(k) else
             hide_agent_tokens(special(v) if (special := _BY_NAME.get(k.lower())) is not None else
                               _redact_params_in(v) if "=" in v else v))  # the test first: most headers have none
            for k, v in headers]


def _redact_subprotocols(value: str) -> str:
    """A WebSocket's subprotocol list with the credentials browsers must send in it redacted: what follows the
    first dotted part that names a credential (``openai-insecure-api-key.KEY``; Kubernetes'
    ``base64url.bearer.authorization.k8s.io.TOKEN`` keeps ``base64url.bearer.``), and an item after one that is
    a credential's name alone (Deepgram's ``token, KEY``; ``access_token, JWT``). Parts are read one by one:
    a header of any length costs linear time on the event loop."""
    items = value.split(",")
    for at, item in enumerate(items):
        word = item.strip()
        if not word or is_redacted(word):  # a stored value passed again stays as it is
            continue
        if at and is_secret_name(items[at - 1].strip()) and "." not in items[at - 1]:
            items[at] = item.replace(word, redact_value(word))
            continue
        parts = word.split(".")
        for cut, part in enumerate(parts[:-1], 1):
            if is_secret_name(part):
                items[at] = item.replace(word, ".".join(parts[:cut]) + "." + redact_value(".".join(parts[cut:])))
                break
    return ",".join(items)


# An agent's base-URL path, /agents/<id>/<token>, anywhere in a value (a query value, a header, written with
# "/" or percent-encoded "%2F"): its token as new_token() makes them, 24 URL-safe characters, not all lowercase
# hex (that is a MongoDB ObjectId). The id is bounded and never crosses a "%2F": a long header (on the event
# loop) costs linear time.
_SLASH = r"(?:/|%2[fF])"
_AGENT_TOKEN = re.compile(rf"({_SLASH}agents{_SLASH}(?:(?!%2[fF])[A-Za-z0-9._~%-]){{1,128}}?{_SLASH})"
                          r"((?![0-9a-f]{24}(?![A-Za-z0-9_-]))[A-Za-z0-9_-]{24}|redacted-sha256-[0-9a-f]{12})"
                          r"(?![A-Za-z0-9_-])")


# The password of a URL's user information anywhere in a value, written as is or percent-encoded: an agent's
# proxy URL (``http://ID:TOKEN@host:port``, what its HTTP_PROXY holds) echoed into a query value or a header.
_ANY_URL_PASSWORD = re.compile(r"(://[^/?#@\s:<>\"&=,;]*:)([^/?#@\s<>\"&=,;]+)(@)"
                               r"|(%3[aA]%2[fF]%2[fF][^/?#@\s<>\"&=%]*%3[aA])([^/?#@\s<>\"&=%]+)(%40)")


def hide_agent_tokens(text: str, replace: Callable[[str], str] | None = None) -> str:
    """``text`` with the token of every agent base-URL path in it, every URL's password (an agent's proxy
    URL) and every token given as a URL's user (a git host's), redacted (a stored fingerprint stays), or given
    to ``replace`` (fingerprints too: replay blanks both sides to compare them)."""
    def hidden(m: re.Match[str], head: str, secret: str, tail: str = "") -> str:
        if replace is not None:
            return head + replace(secret) + tail
        return m[0] if secret.startswith("redacted-sha256-") else head + redacted_query_value(secret) + tail
    if "agents" in text:
        text = _AGENT_TOKEN.sub(lambda m: hidden(m, m[1], m[2]), text)
    if "@" in text or "%40" in text:
        text = _ANY_URL_PASSWORD.sub(lambda m: hidden(m, m[1], m[2], m[3]) if m[1] else hidden(m, m[4], m[5], m[6]),
                                     text)
        text = _URL_USER_TOKEN.sub(lambda m: hidden(m, m[1], m[2], (m[3] or "") + m[4]), text)
    return text


# A token as a URL's user (``https://ghp_…@github.com/…``, ``https://TOKEN:x-oauth-basic@github.com/…``: git
# hosts take one so): a name of TOKEN_USER_CHARS or more, with a password or not (a password is redacted
# apart). Names people and tools use (``git``, ``x-access-token``) are shorter. The password part stops where
# a URL part or a value's next parameter begins: one scan per "://", linear on any header.
TOKEN_USER_CHARS = 20
_URL_USER_TOKEN = re.compile(rf"(://|%3[aA]%2[fF]%2[fF])([A-Za-z0-9._~-]{{{TOKEN_USER_CHARS},}})"
                             r"((?::|%3[aA])[^/?#@\s<>\"&=,;]*?)?(@|%40)")


# A parameter in a header value after ?, &, ; or an OAuth fragment's # (and the blanks a header puts after "; "); its
# value a quoted string (RFC 9110 5.6.4), or up to where the next parameter or URL part starts.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_HEADER_PARAM = re.compile(rf'([?&;#][ \t]*)([^=&;?#\s<>"/]+)=({_QUOTED}|[^&;#?\s<>"]*)')
# One at the start of a header's value, or after a "," (a list's item): its value ends at a "," too.
_LIST_PARAM = re.compile(rf'(^|,[ \t]*)([^=&;,?#\s<>"/]+)=({_QUOTED}|[^;,\s"]*)')
# A path parameter (``/x;jsessionid=...``): its value ends at the next path segment too.
_PATH_PARAM = re.compile(r"(;)([^=;/?#]+)=([^;/?#]*)")


def _map_param(match: re.Match[str], replace: Callable[[str], str | None], *, urls_only: bool = True,
               query_at: int = -1) -> str:
    """A matched ``name=value`` (after its separator) with a secret name's value replaced, or dropped (None).
    OAuth code names count in URLs only: ``urls_only`` says every parameter of the value is a URL's, else only
    those after ?, & or #, or after a ; past ``query_at``, where a query or fragment began (``/cb?x=1;code=...``)."""
    sep, name, value = match.groups()
    in_url = urls_only or sep[:1] in ("?", "&", "#") or (sep[:1] == ";" and 0 <= query_at < match.start())
    secret = is_secret_param if in_url else is_secret_name
    if not value or not secret(unquote(name)):
        return match[0]
    new = replace(value)
    return "" if new is None else f"{sep}{name}={new}"


# The password of a URL's user information (``https://user:PASSWORD@host/``) in a URL-valued header, which holds
# URLs only: it may hold any character a URL allows (elsewhere, _ANY_URL_PASSWORD stops at "&", "=", "," and ";",
# where a value's next parameter may begin).
_URL_PASSWORD = re.compile(r"(://[^/?#@\s:<>\"]*:)([^/?#@\s<>\"]+)(@)")


def _redact_urls_in(value: str) -> str:
    if "@" in value:
        value = _URL_PASSWORD.sub(lambda m: f"{m[1]}{redacted_query_value(m[2])}{m[3]}", value)
    return _redact_params_in(value, urls_only=True)


# Headers whose values are read their own way, by lower-case name (one lookup per header).
_BY_NAME: dict[str, Callable[[str], str]] = {**dict.fromkeys(URL_HEADERS, _redact_urls_in),
                                             "sec-websocket-protocol": _redact_subprotocols}


def _redact_params_in(value: str, *, urls_only: bool = False) -> str:
    """Every secret ``name=value`` parameter of a header's value redacted: a header of any name may hold URLs
    (``X-Original-URL: /v1?api_key=...``), or parameters (``x; token=...``, ``token=...``, ``a=1, token="..."``)."""
    query_at = min((at for at in (value.find("?"), value.find("#")) if at >= 0), default=-1)  # once, not per match
    value = _HEADER_PARAM.sub(lambda m: _map_param(m, redacted_query_value, urls_only=urls_only, query_at=query_at),
                              value)
    if urls_only:
        return value
    return _LIST_PARAM.sub(lambda m: _map_param(m, redacted_query_value, urls_only=False), value)


def redact_query(target: str) -> str:
    """A URL or path with the values of secret-named query parameters and path parameters
    (``/x;jsessionid=...``) redacted."""
    return map_secret_query(target, redacted_query_value)


def map_secret_query(target: str, replace: Callable[[str], str | None], _depth: int = 0) -> str:
    """A URL or path with each secret-named query (or path) parameter's value replaced by ``replace(value)``;
    a parameter for which it returns None is dropped. A value that is itself a URL with a query
    (``?url=https://x/?api_key=...``, or percent-encoded) is looked into too."""
    head, sep, query = target.partition("?")
    if ";" in head:
        head = _PATH_PARAM.sub(lambda m: _map_param(m, replace), head)
    if not sep:
        return head
    query, hash_sep, fragment = query.partition("#")
    # Parameters part at & and also at ; (as many servers still read them: ?x=1;api_key=...).
    pieces = re.split(r"([&;])", query)
    kept: list[str] = []
    for at in range(0, len(pieces), 2):
        part = pieces[at]
        name, eq, value = part.partition("=")
        if eq and value and is_secret_param(unquote(name)):
            new = replace(value)
            if new is None:
                continue
            part = f"{name}={new}"
        elif eq and _depth < 2 and ("?" in value or "%3f" in value.lower()):
            part = f"{name}={_map_nested_query(value, replace, _depth + 1)}"
        kept.extend((pieces[at - 1] if at and kept else "", part))
    query = "".join(kept)
    return head + (sep if query or kept else "") + query + hash_sep + fragment


def _map_nested_query(value: str, replace: Callable[[str], str | None], depth: int) -> str:
    """A query value holding a URL with its secret parameters mapped: as written, or percent-encoded again where it
    came so (the value is left as it was when nothing in it changes)."""
    encoded = "?" not in value
    inner = unquote(value) if encoded else value
    mapped = map_secret_query(inner, replace, depth)
    if mapped == inner:
        return value
    return quote(mapped, safe="") if encoded else mapped


_ASSIGNED = re.compile(r"-{0,2}([A-Za-z0-9_.-]+)=(.+)", re.S)  # NAME=VALUE, --name=value
_HEADER_ARG = re.compile(r"([A-Za-z0-9_-]+):\s*(.+)", re.S)  # curl -H 'Authorization: Bearer ...'
_NOT_VALUES = ("file", "path", "dir")  # --key-file k.pem names where a secret is, not the secret
MIN_COMMAND_SECRET = 6
_USER_OPTIONS = ("user", "proxy-user")  # curl's USER:PASSWORD options


def redact_command(command: str) -> str:
    """A command line (as ``shlex.join`` writes it) with the credentials it carries redacted: the values of
    secret-named variables, options and header arguments, URL passwords and secret query values; a shell
    string argument (``sh -c '...'``) is looked into too."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    found: set[str] = set()
    lists = [words]
    for word in words:
        if any(c.isspace() for c in word):
            try:
                lists.append(_shell_words(word))
            except ValueError:
                pass
    for listed in lists:
        for word in listed:
            _command_secrets(word, found)
        _option_values(listed, found)
    for secret in sorted((s for s in found if _may_be_secret(s)), key=len, reverse=True):
        command = command.replace(secret, f"<redacted sha256:{fingerprint(secret)}>")
    return command


def _shell_words(script: str) -> list[str]:
    """A shell string's words as the shell splits them (`export KEY=v; run` at the ;), # and : kept in words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    return list(lexer)


def _may_be_secret(value: str) -> bool:
    # A short value would redact stray text all over the command; a placeholder is filled in per prompt.
    return len(value) >= MIN_COMMAND_SECRET and "{" not in value


def _command_secrets(word: str, found: set[str]) -> None:
    if (assigned := _ASSIGNED.fullmatch(word)) is not None:
        name, value = assigned.groups()
        if word.startswith("--") and name in _USER_OPTIONS and ":" in value:  # curl --user=USER:PASSWORD
            found.add(value.partition(":")[2])
            return
        if is_secret_name(name):
            if not any(c.isspace() for c in value):  # else a shell string, looked into word by word
                found.add(value)
            return
        word = value  # --header=Authorization: ..., --url=https://...
    if (header := _HEADER_ARG.fullmatch(word)) is not None and is_secret_name(header[1]):
        scheme, sep, rest = header[2].partition(" ")
        found.add(rest if sep and scheme.isalpha() and rest else header[2])
    if "://" in word:
        try:
            password = urlsplit(word).password if "@" in word else None
        except ValueError:  # not a URL urllib can split (``http://[abc@x/``): its other checks still run
            password = None
        if password:
            found.add(password)
        found.update(m[2] for m in _URL_USER_TOKEN.finditer(word))  # in a query value too, or percent-encoded
        def note(value: str) -> str:
            found.add(unquote(value))
            return value
        map_secret_query(word, note)


def _option_values(words: list[str], found: set[str]) -> None:
    # --api-key VALUE: the word after a secret-named option; curl -u USER:PASSWORD
    for option, value in zip(words, words[1:]):
        name = option.lstrip("-")
        if option.startswith("-") and "=" not in option and is_secret_name(name) and not name.endswith(_NOT_VALUES):
            found.add(value)
        elif option in ("-u", *(f"--{name}" for name in _USER_OPTIONS)) and ":" in value:
            found.add(value.partition(":")[2])


def new_token() -> str:
    """A fresh agent token for proxy credentials."""
    return secrets.token_urlsafe(18)


def hash_token(token: str) -> str:
    """What the store keeps of an agent token: enough to check it, not to reuse it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str | None) -> bool:
    """Constant-time check of a presented token against the stored hash."""
    return token_hash is not None and hmac.compare_digest(hash_token(token), token_hash)
