"""The HTTP(S) proxy on the host that is a restricted VM's one way out.

Three kinds of request, one per connection (the rewritten head goes upstream with
``Connection: close``, then the connection is a byte pipe both ways):

* ``CONNECT host:port``: a tunnel, when the allowlist allows it;
* ``GET http://host[:port]/path`` (absolute URI): forwarded in origin form, same checks, and the
  ``Host`` header must name the same authority;
* ``POST /v1/messages`` (origin form, i.e. addressed to the proxy itself): the API endpoint,
  forwarded to ``api_url`` with the guest's placeholder credential replaced by the real one
  (``x-api-key``, or ``Authorization: Bearer`` for an OAuth token). Only here is a credential added.

A name the list allows is resolved here and refused when any of its addresses is one of the host's
own (see :meth:`.Allowlist.check_addresses`); the connection goes to an address that was checked,
so a second DNS answer gains nothing. Refusals get a 403 naming the rule and the ``--allow`` value
that would lift it. Bounded throughout: at most ``max_clients`` connections (the rest get a 503), a
head of at most ``max_head`` bytes read within ``head_timeout`` s, pipes closed after
``idle_timeout`` s of silence; no client can crash it. Every request is one line in the
:class:`.ProxyLog`.
"""

from __future__ import annotations

import re
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

from .allowlist import (FLAG, Allowlist, BadTarget, Decision, IsLocal, authority, canonical_host,
                        local_address, parse_ip, split_authority)
from .log import ProxyLog
from .upstream import Credentials, Upstream

Resolver = Callable[[str, int], Sequence[str]]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
               "te", "trailer", "upgrade"}
_CREDENTIAL_HEADERS = {"x-api-key", "authorization"}
API_RULE = "api endpoint"
CHUNK = 256 * 1024


@dataclass(frozen=True)
class Limits:
    max_clients: int = 128
    max_head: int = 64 * 1024
    max_headers: int = 200
    head_timeout: float = 30.0
    connect_timeout: float = 15.0
    idle_timeout: float = 900.0  # a model can think for minutes between streamed tokens


class Refused(Exception):
    """A request answered with an error status and logged as refused."""

    def __init__(self, status: int, decision: Decision, method: str = "", host: str = "", port: int = 0,
                 outcome: str = "deny"):
        super().__init__(decision.rule)
        self.status, self.decision = status, decision
        self.method, self.host, self.port, self.outcome = method, host, port, outcome


class _ClientGone(Exception):
    pass


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]


def parse_head(head: bytes, max_headers: int) -> Request:
    """The request line and headers of ``head`` (ending in CRLF CRLF); ValueError when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1] or not re.match(r"^HTTP/1\.[01]$", parts[2]):
        raise ValueError("malformed request line")
    if any(ord(c) < 0x21 or ord(c) > 0x7e for c in parts[1]):
        raise ValueError("control or non-ASCII characters in the request target")
    if len(lines) - 1 > max_headers:
        raise ValueError(f"more than {max_headers} header lines")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name) or any(c in value for c in "\r\n\0"):
            raise ValueError("malformed header line")
        headers.append((name, value.strip()))
    return Request(parts[0].upper(), parts[1], parts[2], headers)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host``, in the order the system gives them."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _reply(sock: socket.socket, status: int, reason: str, body: str, drain: bool = True) -> None:
    data = body.encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\nX-Proxy: devops-tasks\r\n\r\n")
    try:
        sock.settimeout(5)
        sock.sendall(head.encode() + data)
        # Closing with unread input makes the kernel send a reset, which can destroy the answer
        # before the client reads it: read what is still coming, briefly and bounded, first
        # (without waiting at all when ``drain`` is False: the acceptor must not block).
        sock.shutdown(socket.SHUT_WR)
        if not drain:
            sock.setblocking(False)
            for _ in range(16):
                if not sock.recv(65536):
                    break
            return
        sock.settimeout(0.5)
        deadline, drained = time.monotonic() + 1.0, 0
        while time.monotonic() < deadline and drained < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class ProxyServer:
    """Serve on a unix socket (:meth:`listen_unix`, what QEMU's guestfwd connects to) or a TCP port
    (:meth:`listen_tcp`), in threads, until :meth:`close`. ``stats``: what this server decided."""

    def __init__(self, allowlist: Allowlist, log: ProxyLog, api: Optional[Upstream] = None,
                 credentials: Credentials = Credentials(), *, self_names: Sequence[str] = (),
                 resolver: Resolver = system_resolver, is_local: IsLocal = local_address,
                 limits: Limits = Limits(), ssl_context: Optional[ssl.SSLContext] = None):
        self.allowlist = allowlist
        self.log = log
        self.api = api
        self.credentials = credentials
        self.self_names = {name.lower() for name in self_names}  # host:port the guest calls the proxy by
        self.resolver = resolver
        self.is_local = is_local
        self.limits = limits
        self._ssl_context = ssl_context
        self._listener: Optional[socket.socket] = None
        self._slots = threading.BoundedSemaphore(limits.max_clients)
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._acceptor: Optional[threading.Thread] = None
        self.allowed = 0
        self.denied: Counter[tuple[str, str]] = Counter()  # (host:port, rule) → count

    # -- listening --------------------------------------------------------------------------------
    def listen_unix(self, path: Path) -> Path:
        """Listen on a fresh unix socket at ``path`` (mode 0600; a stale file there is replaced)."""
        path = Path(path)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            path.chmod(0o600)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        sock = socket.create_server((host, port), backlog=64)
        self._listener = sock
        return sock.getsockname()[:2]

    def start(self) -> "ProxyServer":
        if self._listener is None:
            raise RuntimeError("listen first")
        self._listener.settimeout(0.2)
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._acceptor.start()
        return self

    def close(self) -> None:
        """Stop accepting, end every connection, wait for the threads (bounded)."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> "ProxyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: back off, never spin
                continue
            if not self._slots.acquire(blocking=False):
                _reply(conn, 503, _REASONS[503], "devops-tasks proxy: too many connections\n", drain=False)
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="proxy-client", daemon=True)
            with self._lock:
                self._clients.add(conn)
                self._threads.add(thread)
            thread.start()

    # -- one connection -----------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        upstream: Optional[socket.socket] = None
        try:
            try:
                head, rest = self._read_head(conn)
                if head is None:
                    return
                upstream, first, logged = self._route(conn, head)
                sent = self._pipe(conn, upstream, first + rest)
                self._record(logged[0], logged[1], logged[2], "allow", logged[3], sent)
            except Refused as refused:
                self._refuse(conn, refused)
            except _ClientGone:
                pass
            except Exception as exc:  # never let a client take the proxy down
                self.log.write("", "", 0, "fail", f"proxy error: {type(exc).__name__}")
        finally:
            for sock in (upstream, conn):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            with self._lock:
                self._clients.discard(conn)
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _read_head(self, conn: socket.socket) -> tuple[Optional[Request], bytes]:
        limits = self.limits
        buffer = bytearray()
        deadline = time.monotonic() + limits.head_timeout
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buffer) > limits.max_head:
                raise Refused(431, Decision(False, f"request head over {limits.max_head} bytes"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refused(408, Decision(False, f"request head not complete within {limits.head_timeout:g} s"))
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(8192)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                if buffer:
                    self.log.write("", "", 0, "deny", "client closed before the request head ended")
                return None, b""
            buffer += chunk
        if end + 4 > limits.max_head:
            raise Refused(431, Decision(False, f"request head over {limits.max_head} bytes"))
        try:
            request = parse_head(bytes(buffer[: end + 4]), limits.max_headers)
        except ValueError as exc:
            raise Refused(400, Decision(False, f"bad request: {exc}")) from None
        return request, bytes(buffer[end + 4 :])

    def _route(self, conn: socket.socket, req: Request):
        """Check ``req`` and connect upstream: (upstream socket, head to send first, log fields)."""
        if req.method == "CONNECT":
            host, port = self._authority(req, req.target, None)
            self._check_host_header(req, host, port, default_port=None)
            upstream, rule = self._open(req.method, host, port)
            try:
                conn.settimeout(30)
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            except OSError:
                upstream.close()
                raise _ClientGone() from None
            return upstream, b"", (req.method, host, port, rule)
        if req.target.startswith("/"):
            return self._api_request(req, req.target)
        parts = urlsplit(req.target)
        if parts.netloc.lower() in self.self_names:
            return self._api_request(req, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        if parts.scheme.lower() != "http" or not parts.netloc or "@" in parts.netloc:
            host, port = self._soft_authority(parts.netloc, 443)
            raise Refused(400, Decision(False, "only http:// URLs in a request line (https goes through CONNECT)"),
                          req.method, host, port)
        host, port = self._authority(req, parts.netloc, 80)
        self._check_host_header(req, host, port, default_port=80)
        upstream, rule = self._open(req.method, host, port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = [(k, v) for k, v in req.headers if k.lower() not in _dropped(req)]
        if not req.header("host"):
            headers.insert(0, ("Host", parts.netloc))
        return upstream, _head(req.method, path, headers + [("Connection", "close")]), (req.method, host, port, rule)

    def _authority(self, req: Request, text: str, default_port: Optional[int]) -> tuple[str, int]:
        try:
            host, port = split_authority(text, default_port)
            canonical_host(host)
        except BadTarget as exc:
            raise Refused(400, Decision(False, f"bad target: {exc}"), req.method, text[:100], 0) from None
        return host, port

    @staticmethod
    def _soft_authority(text: str, default_port: int) -> tuple[str, int]:
        try:
            return split_authority(text, default_port)
        except BadTarget:
            return text[:100], 0

    def _check_host_header(self, req: Request, host: str, port: int, default_port: Optional[int]) -> None:
        values = req.header("host")
        if not values:
            return
        mismatch = Refused(403, Decision(False, "Host header mismatch: it names another host than the request"),
                           req.method, host, port)
        if len(values) > 1:
            raise mismatch
        try:
            named, named_port = split_authority(values[0], default_port if default_port is not None else port)
            if canonical_host(named)[0] != canonical_host(host)[0] or named_port != port:
                raise mismatch
        except BadTarget:
            raise mismatch from None

    def _open(self, method: str, host: str, port: int) -> tuple[socket.socket, str]:
        """The checked connection to ``host:port``; :class:`Refused` when the rules or the network say no."""
        decision, entry = self.allowlist.match(host, port)
        if not decision.allowed or entry is None:
            raise Refused(403 if decision.hint else 400, decision, method, host, port)  # no hint: not a host
        canonical, is_ip = canonical_host(host)
        if is_ip:
            addresses = [canonical]
        else:
            try:
                addresses = list(self.resolver(canonical, port))
            except (OSError, UnicodeError) as exc:
                raise Refused(502, Decision(False, f"cannot resolve {canonical}: {exc}"), method, host, port,
                              "fail") from None
            if not addresses:
                raise Refused(502, Decision(False, f"{canonical} has no address"), method, host, port, "fail")
        checked = self.allowlist.check_addresses(entry, canonical, port, addresses, self.is_local)
        if not checked.allowed:
            raise Refused(403, checked, method, host, port)
        return self._connect(addresses, port, method, host), entry.text

    def _connect(self, addresses: Sequence[str], port: int, method: str, host: str) -> socket.socket:
        last: Optional[OSError] = None
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(self.limits.connect_timeout)
            try:
                sock.connect((address, port))
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        status = 504 if isinstance(last, socket.timeout) else 502
        reason = "timed out" if isinstance(last, socket.timeout) else (getattr(last, "strerror", None) or str(last))
        raise Refused(status, Decision(False, f"upstream connection failed: {reason}"), method, host, port, "fail")

    def _api_request(self, req: Request, path: str):
        """The API endpoint: to ``api_url``, the placeholder credential replaced by the real one."""
        api = self.api
        if api is None:
            raise Refused(400, Decision(False, "no API endpoint here: send proxy requests (absolute URL or CONNECT)"),
                          req.method, "", 0)
        credential = self.credentials.header_for(req.headers)
        dropped = _dropped(req) | {"host"} | (_CREDENTIAL_HEADERS if credential else set())
        headers = [(k, v) for k, v in req.headers if k.lower() not in dropped]
        headers.insert(0, ("Host", api.host_header))
        if credential:
            headers.append(credential)
        headers.append(("Connection", "close"))
        ip = parse_ip(api.host)
        upstream = self._connect([ip] if ip else _resolve_all(self.resolver, api), api.port, req.method, api.host)
        if api.scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            try:
                upstream.settimeout(self.limits.connect_timeout)
                upstream = context.wrap_socket(upstream, server_hostname=api.host)
            except (OSError, ssl.SSLError) as exc:
                upstream.close()
                raise Refused(502, Decision(False, f"TLS to {api.host} failed: {exc}"), req.method, api.host,
                              api.port, "fail") from None
        rule = API_RULE + (" (credential added)" if credential else "")
        return upstream, _head(req.method, api.prefix + path, headers), (req.method, api.host, api.port, rule)

    # -- piping and answers -------------------------------------------------------------------------
    def _pipe(self, client: socket.socket, upstream: socket.socket, first: bytes) -> int:
        """Bytes both ways until upstream ends (or the client ends and upstream then does), or idle."""
        idle = self.limits.idle_timeout
        total = 0
        try:
            if first:
                upstream.settimeout(idle)
                upstream.sendall(first)
                total += len(first)
        except OSError:
            return total
        peer = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ)
            selector.register(upstream, selectors.EVENT_READ)
            reading = {client, upstream}
            last = time.monotonic()
            while reading and not self._stopping.is_set():
                events = selector.select(timeout=min(idle, 1.0))
                if not events:
                    if time.monotonic() - last >= idle:
                        break
                    continue
                last = time.monotonic()
                for key, _ in events:
                    src = key.fileobj
                    try:
                        src.settimeout(idle)
                        data = src.recv(CHUNK)
                        if isinstance(src, ssl.SSLSocket):
                            while data and src.pending():
                                data += src.recv(src.pending())
                    except (OSError, ssl.SSLError):
                        data = b""
                    if not data:
                        selector.unregister(src)
                        reading.discard(src)
                        if src is upstream:
                            return total  # the answer is complete: nothing more will be relayed
                        if not isinstance(upstream, ssl.SSLSocket):
                            try:
                                upstream.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
                        continue
                    try:
                        peer[src].settimeout(idle)
                        peer[src].sendall(data)
                    except OSError:
                        return total
                    total += len(data)
        return total

    def _refuse(self, conn: socket.socket, refused: Refused) -> None:
        decision = refused.decision
        where = authority(refused.host, refused.port) if refused.host else "the request"
        body = f"devops-tasks proxy: {refused.method or 'request'} {where} refused: {decision.rule}.\n"
        if decision.hint:
            body += f"To allow it: inv claude {FLAG} {decision.hint}\n"
        # recorded before the client hears it: whoever got the 403 finds it counted and logged
        self._record(refused.method, refused.host, refused.port, refused.outcome, decision.rule, 0)
        _reply(conn, refused.status, _REASONS.get(refused.status, "Error"), body)

    def _record(self, method: str, host: str, port: int, decision: str, rule: str, nbytes: int) -> None:
        """Count first, then log: whoever sees the log line also sees the count."""
        with self._lock:
            if decision == "allow":
                self.allowed += 1
            else:
                self.denied[(authority(host, port) if host else "(bad request)", rule)] += 1
        self.log.write(method, host, port, decision, rule, nbytes)


def _head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _dropped(req: Request) -> set[str]:
    """Hop-by-hop headers, and the ones the client's Connection header names."""
    named = {token.strip().lower() for value in req.header("connection") for token in value.split(",")}
    return _HOP_BY_HOP | {name for name in named if name}


def _resolve_all(resolver: Resolver, api: Upstream) -> list[str]:
    try:
        return list(resolver(api.host, api.port))
    except (OSError, UnicodeError) as exc:
        raise Refused(502, Decision(False, f"cannot resolve {api.host}: {exc}"), "", api.host, api.port,
                      "fail") from None
