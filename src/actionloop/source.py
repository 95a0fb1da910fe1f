"""Where the auto-init code comes from: a file, or an http(s) URL (README: Auto-init from a URL).

A ConfigMap holds at most 1 MiB, so a large action (a zip with its
virtualenv) is fetched from a URL at start-up instead. What is fetched runs
as the action, so a URL is trusted only with OW_AUTOINIT_SHA256, the sha256
of the expected bytes (config.py refuses a URL without it): a compromised or
wrong server, a proxy that rewrites, a truncated download all fail the check,
loudly, and nothing of theirs runs. The same check applies to a file when set.

The download uses the standard library in a thread: urllib honours
HTTPS_PROXY/NO_PROXY and SSL_CERT_FILE as clusters expect, and start-up needs
no HTTP client of ours. It is bounded: OW_MAX_ARCHIVE bytes, and READ_TIMEOUT
seconds of silence. A transient failure (no connection, 5xx, 429) is retried
with backoff; then the pod fails and Kubernetes restarts it, with its own.

A URL may carry a credential: `user:password@` (sent as HTTP Basic, RFC 7617,
and only to the URL's own origin, never after a redirect elsewhere), or a
signature in the query (a presigned URL). So a URL is never logged or put in
an error as it is, only as `shown(url)`: scheme, host and path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import re
import urllib.error
import urllib.parse
import urllib.request  # loaded with the server anyway (aiohttp imports it)
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import RequestError, SourceError

if TYPE_CHECKING:
    from http.client import HTTPMessage, HTTPResponse

URL_SCHEMES = ("https://", "http://")
READ_TIMEOUT = 30.0
# Seconds before each retry of a download that failed for a passing reason.
RETRIES = (1.0, 2.0, 4.0)
CHUNK = 1 << 16


def is_url(location: str) -> bool:
    return location[:8].lower().startswith(URL_SCHEMES)


def url_problem(url: str) -> str:
    """Why `url` cannot be fetched, whatever the network says; "" if it can.
    (A setting refused at start, not a download retried three times.)"""
    if not is_url(url):
        return "a file path, or an https:// or http:// URL"
    if re.search(r"[\x00-\x20\x7f]", url):
        return "a URL has no spaces or control characters (write a space as %20)"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if not parts.hostname:
        return "a URL names a host"
    return ""


def shown(location: str) -> str:
    """`location` as logs and errors may show it: a URL without its userinfo
    (`user:password@`) and with `?…` for its query (a presigned URL's
    signature); a file path as it is."""
    if "://" not in location:
        return location
    try:
        parts = urllib.parse.urlsplit(location)
    except ValueError:  # not a URL: show only what cannot be a secret
        return location.partition("://")[0] + "://…"
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


async def read(location: str, sha256: str, limit: int) -> bytes:
    """The code at `location`, checked against `sha256` when given.

    SourceError when it cannot be had or is not the expected code;
    RequestError when it is empty, as an empty /init would be.
    """
    if is_url(location):
        code = await _download(location, limit)
    else:
        try:
            code = await asyncio.to_thread(Path(location).read_bytes)
        except OSError as exc:
            raise SourceError(f"cannot read {location}: {exc.strerror}") from exc
    if sha256:
        digest = hashlib.sha256(code).hexdigest()
        if digest != sha256.lower():
            raise SourceError(
                f"{shown(location)} has sha256 {digest} ({len(code)} bytes), "
                f"but OW_AUTOINIT_SHA256 is {sha256}: not loaded"
            )
    if not code.strip():
        raise RequestError(f"{shown(location)} is empty")
    return code


async def _download(url: str, limit: int) -> bytes:
    for delay in (*RETRIES, None):
        try:
            return await asyncio.to_thread(_get, url, limit)
        except _Passing as exc:
            if delay is None:
                raise SourceError(f"cannot fetch {shown(url)}: {exc}") from exc
            from .runtime import log

            log(f"actionloop: cannot fetch {shown(url)} ({exc}); again in {delay:g} s")
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class _Passing(Exception):
    """A failure that may be gone on the next try."""


def _get(url: str, limit: int) -> bytes:
    """GET `url` (in a thread); at most `limit` bytes."""
    bare, authorization = _credentials(url)
    # identity: the bytes as stored are the bytes the sha256 pins.
    request = urllib.request.Request(bare, headers={"User-Agent": "actionloop", "Accept-Encoding": "identity"})
    if authorization:
        # Unredirected: urllib would copy a plain header to any redirect's
        # host; _Redirects sends it again only to the same origin.
        request.add_unredirected_header("Authorization", authorization)
    opener = urllib.request.build_opener(_Redirects(bare, authorization))
    try:
        with opener.open(request, timeout=READ_TIMEOUT) as response:
            return _body(url, response, limit)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code == 429:
            raise _Passing(reason) from exc
        raise SourceError(f"cannot fetch {shown(url)}: {reason}") from exc
    except http.client.IncompleteRead as exc:
        got, more = len(exc.partial), exc.expected
        raise _Passing(f"the body ended after {got} of {got + more} bytes" if more else repr(exc)) from exc
    except http.client.HTTPException as exc:
        raise _Passing(repr(exc)) from exc
    except (urllib.error.URLError, OSError) as exc:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(cause, TimeoutError):
            raise _Passing(f"timed out: no answer for {READ_TIMEOUT:g} s") from exc
        # A certificate that does not verify is no passing failure.
        why = str(cause) or type(cause).__name__
        if "CERTIFICATE_VERIFY_FAILED" in why:
            raise SourceError(f"cannot fetch {shown(url)}: {why}") from exc
        raise _Passing(why) from exc
    except ValueError as exc:  # a redirect to a URL urllib cannot use; its text repeats the URL
        raise SourceError(f"cannot fetch {shown(url)}: a redirect to an invalid URL") from exc


def _credentials(url: str) -> tuple[str, str]:
    """`url` without its userinfo, and the Basic `Authorization` it stood for ("" if none).

    In a URL the userinfo is percent-encoded (a `@` in a password is `%40`);
    the header carries it decoded (RFC 7617: user-id, colon, password).
    """
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, ""
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return bare, "Basic " + base64.b64encode(pair.encode()).decode()


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """Scheme, host and port (RFC 6454), the default port made explicit."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return parts.scheme, (parts.hostname or ""), port


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects (safe: the hash checks what arrives), and sends the
    URL's credential on only to a URL of the same origin, as browsers and curl
    do: never to another host, port or scheme (https to http would expose it)."""

    def __init__(self, url: str, authorization: str) -> None:
        self.origin = _origin(url)
        self.authorization = authorization

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.authorization and _origin(new.full_url) == self.origin:
            new.add_unredirected_header("Authorization", self.authorization)
        return new


def _body(url: str, response: HTTPResponse, limit: int) -> bytes:
    length = response.headers.get("Content-Length")
    too_large = f"{shown(url)} is over OW_MAX_ARCHIVE ({limit} bytes)"
    if length is not None and length.isdigit() and int(length) > limit:
        raise SourceError(too_large)
    try:
        if length is not None and length.isdigit():
            # One allocation of the announced size, as the unpack reads it in
            # place: a large action is held once, not twice, in the pod's memory.
            return response.read()  # IncompleteRead if it ends early
        # Unknown length: one buffer that grows in place, and getvalue() hands
        # it over without a copy. A list of chunks joined at the end held the
        # body twice, and its 64 KiB pieces stayed in the heap afterwards.
        buffer = io.BytesIO()
        while chunk := response.read(CHUNK):
            buffer.write(chunk)
            if buffer.tell() > limit:
                raise SourceError(too_large)
        return buffer.getvalue()
    except TimeoutError as exc:
        raise _Passing(f"timed out: the body stalled for {READ_TIMEOUT:g} s") from exc
