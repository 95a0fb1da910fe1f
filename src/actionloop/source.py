"""Where the auto-init code comes from: a file, or an http(s) URL (README: Large actions).

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
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RequestError, SourceError

if TYPE_CHECKING:
    from http.client import HTTPResponse

URL_SCHEMES = ("https://", "http://")
READ_TIMEOUT = 30.0
# Seconds before each retry of a download that failed for a passing reason.
RETRIES = (1.0, 2.0, 4.0)
CHUNK = 1 << 16


def is_url(location: str) -> bool:
    return location.startswith(URL_SCHEMES)


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
                f"{location} has sha256 {digest} ({len(code)} bytes), but OW_AUTOINIT_SHA256 is {sha256}: not loaded"
            )
    if not code.strip():
        raise RequestError(f"{location} is empty")
    return code


async def _download(url: str, limit: int) -> bytes:
    for delay in (*RETRIES, None):
        try:
            return await asyncio.to_thread(_get, url, limit)
        except _Passing as exc:
            if delay is None:
                raise SourceError(f"cannot fetch {url}: {exc}") from exc
            from .runtime import log

            log(f"actionloop: cannot fetch {url} ({exc}); again in {delay:g} s")
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class _Passing(Exception):
    """A failure that may be gone on the next try."""


def _get(url: str, limit: int) -> bytes:
    """GET `url` (in a thread); at most `limit` bytes."""
    import http.client
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "actionloop"})
    try:
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as response:
            return _body(url, response, limit)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code == 429:
            raise _Passing(reason) from exc
        raise SourceError(f"cannot fetch {url}: {reason}") from exc
    except http.client.HTTPException as exc:  # a body cut short
        raise _Passing(repr(exc)) from exc
    except (urllib.error.URLError, OSError) as exc:
        # A certificate that does not verify is no passing failure.
        why = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc) or type(exc).__name__
        if "CERTIFICATE_VERIFY_FAILED" in why:
            raise SourceError(f"cannot fetch {url}: {why}") from exc
        raise _Passing(why) from exc


def _body(url: str, response: HTTPResponse, limit: int) -> bytes:
    length = response.headers.get("Content-Length")
    too_large = f"{url} is over OW_MAX_ARCHIVE ({limit} bytes)"
    if length is not None and length.isdigit() and int(length) > limit:
        raise SourceError(too_large)
    if length is not None and length.isdigit():
        # One allocation of the announced size, as the unpack reads it in
        # place: a large action is held once, not twice, in the pod's memory.
        return response.read()  # IncompleteRead if it ends early
    chunks, size = [], 0
    while chunk := response.read(CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise SourceError(too_large)
    return b"".join(chunks)
