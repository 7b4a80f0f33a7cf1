"""HTTP as the image sources speak it.

* Which URLs may be used: https, or plain http to this machine only (127.0.0.0/8, ::1,
  ``localhost``), on the first request and on every redirect; https never redirects to http.
* Credentials go to the origin of the first URL only: a redirect to another host (a CDN, object
  storage) gets none of them.
* Small documents (release JSON, ``manifest.json``, registry manifests, tag lists, tokens,
  checksum files) are read with a size cap, so a hostile or broken server cannot fill memory.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urljoin, urlsplit

import requests

from ..errors import SourceError

MAX_DOCUMENT = 4 << 20  # bytes: far above any real release list, manifest, tag page or token
MAX_REDIRECTS = 10
USER_AGENT = "devops-tasks"
READ_CHUNK = 64 << 10

Reauth = Callable[[requests.Response], Mapping[str, str]]

_REDIRECTS = (301, 302, 303, 307, 308)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what "the same server" means."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port)


def redact(url: str) -> str:
    """``url`` without its query string (signed redirect URLs carry credentials there)."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl() if parts.query else url


def reason(exc: BaseException) -> str:
    """A short cause for a requests error, without URLs' query strings or nested reprs."""
    lowered = str(exc).lower()
    if isinstance(exc, (requests.exceptions.ReadTimeout, TimeoutError)) or "read timed out" in lowered:
        return "timed out waiting for data"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "timed out connecting"
    text = str(exc)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "host name not found"),
        ("Temporary failure in name resolution", "host name not found"),
        ("IncompleteRead", "connection closed before the end of the file"),
        ("Connection broken", "connection broken"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed by the server"),
        ("Connection aborted", "connection aborted"),
    ):
        if needle in text:
            return short
    return text.split("\n")[0][:200]


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (``host`` without brackets or port)."""
    host = host.strip().lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, setting: str = "") -> None:
    """Refuse a URL an image may not come from: anything but https, except plain http to loopback.

    ``setting`` names the config key or variable the URL came from, for the error.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    fix = f"; fix {setting}" if setting else ""
    if scheme == "https":
        return
    if scheme == "http":
        if is_loopback(parts.hostname or ""):
            return
        raise SourceError(
            f"{redact(url)}: plain http is refused for images except on loopback "
            f"(127.0.0.0/8, ::1, localhost): use https{fix}"
        )
    raise SourceError(f"{redact(url)}: not an https URL{fix}")


def open_url(
    session: requests.Session,
    url: str,
    *,
    timeout: tuple[float, float],
    headers: Optional[Mapping[str, str]] = None,
    credentials: Optional[dict[str, str]] = None,
    reauth: Optional[Reauth] = None,
    method: str = "GET",
) -> requests.Response:
    """Send ``method`` to ``url`` (body streamed) and follow redirects by hand.

    ``headers`` go to every hop, ``credentials`` only to the origin of ``url``; each hop must pass
    :func:`check_url`. ``reauth(resp)`` answers one 401 from that origin with fresh credentials
    (``credentials`` is updated in place, so later requests use them too). The response carries
    ``final_url``. Connection errors and timeouts are left to the caller as requests exceptions.
    """
    first = origin(url)
    credentials = credentials if credentials is not None else {}
    current = url
    reauthed = False
    for _ in range(MAX_REDIRECTS + 1):
        check_url(current)
        same_origin = origin(current) == first
        sent = {"User-Agent": USER_AGENT, **(headers or {})}
        if same_origin:
            sent.update(credentials)
        try:
            resp = session.request(method, current, headers=sent, stream=True, timeout=timeout,
                                   allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise SourceError(f"{redact(current)}: TLS error: {reason(exc)}") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise SourceError(f"{redact(current)}: invalid URL: {exc}") from None
        if resp.status_code in _REDIRECTS and resp.headers.get("Location"):
            resp.close()
            target = urljoin(current, resp.headers["Location"])
            if urlsplit(current).scheme == "https" and urlsplit(target).scheme != "https":
                raise SourceError(f"{redact(current)}: refusing a redirect from https to {redact(target)}")
            current = target
            continue
        if resp.status_code == 401 and same_origin and reauth is not None and not reauthed:
            fresh = reauth(resp)
            resp.close()
            credentials.update(fresh)
            reauthed = True
            continue
        resp.final_url = current  # type: ignore[attr-defined]
        return resp
    raise SourceError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")


@dataclass
class Document:
    """A small HTTP answer read whole (at most the cap): what the sources parse."""

    url: str
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON (ValueError when it is not)."""
        return json.loads(self.content)


def get_document(session: requests.Session, url: str, *, limit: int = MAX_DOCUMENT, **options) -> Document:
    """``url`` through :func:`open_url` (``options`` are its keyword arguments) with the body read
    whole, refusing one larger than ``limit`` bytes (after decompression) without reading further."""
    try:
        resp = open_url(session, url, **options)
    except requests.RequestException as exc:
        raise SourceError(f"cannot reach {redact(url)}: {reason(exc)}") from None
    with resp:
        shown = redact(resp.final_url)  # type: ignore[attr-defined]
        too_big = SourceError(f"{shown}: the answer is larger than {_size(limit)}; refusing to read it")
        length = resp.headers.get("Content-Length", "").strip()
        if options.get("method", "GET") != "HEAD" and length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        try:
            for chunk in resp.iter_content(READ_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise too_big
        except requests.RequestException as exc:
            raise SourceError(f"cannot read {shown}: {reason(exc)}") from None
        return Document(url=resp.final_url, status_code=resp.status_code,  # type: ignore[attr-defined]
                        headers=resp.headers, content=bytes(body))


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit and limit % (1 << 20) == 0 else f"{limit} bytes"
