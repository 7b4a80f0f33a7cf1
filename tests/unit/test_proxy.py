"""The host proxy alone: allowlist matching, CONNECT, absolute-URI requests, the API endpoint (the
only place a credential is added), refusals in every form, bounded and robust against bad clients,
and nothing secret in its log. Real sockets on loopback: a real upstream HTTP server, a real proxy."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devops_tasks.proxy.allowlist import (Allowlist, AllowlistError, Entry, canonical_host, local_address,
                                          parse_entry, suggestion)
from devops_tasks.proxy.log import ProxyLog, read_events
from devops_tasks.proxy.server import Limits, ProxyServer, parse_head
from devops_tasks.proxy.upstream import Credentials, Upstream

SECRET = "sk-ant-unit-" + "s3cr3t" * 6
TOKEN = "sk-ant-oat-unit-" + "t0k3n" * 6
PLACEHOLDER = "placeholder-key"


# --------------------------------------------------------------------------- allowlist (pure)


def allows(entries, host, port):
    return Allowlist.parse(entries).match(host, port)[0].allowed


@pytest.mark.parametrize("host, port, expected", [
    ("api.github.com", 443, True),
    ("a.b.github.com", 443, True),
    ("API.GitHub.com.", 443, True),  # case and a trailing dot do not matter
    ("api.github.com", 80, True),
    ("github.com", 443, False),  # *.domain: subdomains only
    ("evilgithub.com", 443, False),
    ("github.com.evil.example", 443, False),
    ("api.github.com", 22, False),  # no port in the entry: 443 and 80 only
])
def test_wildcard_entry(host, port, expected):
    assert allows(["*.github.com"], host, port) is expected


@pytest.mark.parametrize("host, port, expected", [
    ("pypi.org", 443, True), ("pypi.org", 80, True), ("pypi.org", 8443, False),
    ("www.pypi.org", 443, False), ("xpypi.org", 443, False),
])
def test_plain_entry(host, port, expected):
    assert allows(["pypi.org"], host, port) is expected


def test_port_entry_allows_that_port_only():
    assert allows(["example.com:8443"], "example.com", 8443)
    assert not allows(["example.com:8443"], "example.com", 443)
    assert allows(["*.example.com:8443"], "a.example.com", 8443)


def test_ip_entries_match_ip_literals_only():
    rules = ["127.0.0.1:8080", "[::1]:9090"]
    assert allows(rules, "127.0.0.1", 8080)
    assert allows(rules, "[::1]", 9090)
    assert allows(rules, "[0:0::1]", 9090)  # the same address, written otherwise
    assert not allows(rules, "127.0.0.1", 8081)
    assert not allows(rules, "localhost", 8080)
    assert not allows(["localhost:8080"], "127.0.0.1", 8080)
    assert not allows(rules, "[::ffff:127.0.0.1]", 8080)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "a b", "ex_ample..com", "", "ä.example"])
def test_ip_in_disguise_and_junk_are_no_names(host):
    decision, entry = Allowlist.parse(["*.example.org", "127.0.0.1:443", "pypi.org"]).match(host, 443)
    assert not decision.allowed and entry is None


@pytest.mark.parametrize("text", ["a b", "*.com", "*", "host:0", "host:65536", "host:", "http://example.com",
                                  "example.com/path", "", "[::1", "user@host", "*.*.example.com"])
def test_bad_entries_are_errors(text):
    with pytest.raises(AllowlistError, match="is not host, \\*.domain or host:port"):
        parse_entry(text)


def test_entries_are_normalised():
    assert parse_entry("Example.COM.") == Entry("example.com", "example.com")
    assert parse_entry("*.Example.com:8443").text == "*.example.com:8443"
    assert parse_entry("[0:0::1]:80").text == "[::1]:80"


def test_refusal_names_the_rule_and_the_flag_value():
    decision, _ = Allowlist.parse(["pypi.org"]).match("evil.example", 443)
    assert decision.rule == "not on the allowlist (claude.allow, --allow)"
    assert decision.hint == "evil.example"
    assert Allowlist.parse([]).match("evil.example", 8080)[0].hint == "evil.example:8080"
    assert suggestion("::1", 443) == "[::1]:443"


def test_a_name_resolving_to_the_host_is_refused_unless_the_entry_names_the_address():
    rules = Allowlist.parse(["localhost:8080", "127.0.0.1:9090"])
    decision, entry = rules.match("localhost", 8080)
    assert decision.allowed
    checked = rules.check_addresses(entry, "localhost", 8080, ["127.0.0.1"], local_address)
    assert not checked.allowed and "resolves to 127.0.0.1" in checked.rule
    assert checked.hint == "127.0.0.1:8080"
    # any one local address among several refuses (no racing the resolver)
    decision, entry = Allowlist.parse(["example.com"]).match("example.com", 443)
    assert not rules.check_addresses(entry, "example.com", 443, ["93.184.216.34", "::1"], local_address).allowed
    assert rules.check_addresses(entry, "example.com", 443, ["93.184.216.34"], lambda ip: False).allowed
    _, ip_entry = rules.match("127.0.0.1", 9090)
    assert rules.check_addresses(ip_entry, "127.0.0.1", 9090, ["127.0.0.1"], local_address).allowed


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("0.0.0.0", True), ("::", True),
    ("169.254.169.254", True), ("fe80::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.1", False), ("2001:db8::1", False), ("not-an-address", True),
])
def test_local_addresses(address, local):
    assert local_address(address) is local


def test_canonical_host():
    assert canonical_host("[::1]") == ("::1", True)
    assert canonical_host("Example.org.") == ("example.org", False)


def test_parse_head():
    req = parse_head(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX-A:  b \r\n\r\n", 10)
    assert (req.method, req.target, req.version) == ("GET", "http://a.example/x", "HTTP/1.1")
    assert req.headers == [("Host", "a.example"), ("X-A", "b")]
    for bad in (b"GET / HTTP/2\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n folded\r\n\r\n",
                b"GET /\x01 HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"):
        with pytest.raises(ValueError):
            parse_head(bad, 10)
    with pytest.raises(ValueError, match="more than 2 header lines"):
        parse_head(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n", 2)


def test_upstream_url():
    assert Upstream.from_url("https://api.anthropic.com") == Upstream("https", "api.anthropic.com", 443, "")
    up = Upstream.from_url("http://127.0.0.1:8080/prefix/")
    assert (up.port, up.prefix, up.host_header) == (8080, "/prefix", "127.0.0.1:8080")
    for bad in ("ftp://x", "https://", "http://u:p@host", "http://h/?q=1", "http://h:99999"):
        with pytest.raises(ValueError):
            Upstream.from_url(bad)


def test_credential_follows_the_kind_the_guest_used():
    both = Credentials(api_key=SECRET, oauth_token=TOKEN)
    assert both.header_for([("x-api-key", PLACEHOLDER)]) == ("x-api-key", SECRET)
    assert both.header_for([("Authorization", f"Bearer {PLACEHOLDER}")]) == ("Authorization", f"Bearer {TOKEN}")
    assert Credentials(oauth_token=TOKEN).header_for([]) == ("Authorization", f"Bearer {TOKEN}")
    assert Credentials().header_for([("x-api-key", "x")]) is None
    assert SECRET not in repr(both) and TOKEN not in repr(both)


# --------------------------------------------------------------------------- a real proxy


class Upstream_(ThreadingHTTPServer):
    daemon_threads = True


class Recorder:
    """A loopback HTTP server that records every request and answers ``ok <path>``."""

    def __init__(self):
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append({"method": self.command, "path": self.path,
                                          "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body})
                if self.path.endswith("/stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"event: one\n\n")
                    self.wfile.flush()
                    recorder.release.wait(10)
                    self.wfile.write(b"event: two\n\n")
                    return
                data = f"ok {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self.release = threading.Event()
        self.server = Upstream_(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    server = Recorder()
    yield server
    server.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def make_proxy(tmp_path, upstream):
    started = []

    def make(entries=(), limits=Limits(), credentials=Credentials(api_key=SECRET), **kwargs):
        log = ProxyLog(tmp_path / "proxy.log")
        server = ProxyServer(Allowlist.parse(entries), log, api=Upstream.from_url(f"http://127.0.0.1:{upstream.port}/api"),
                             credentials=credentials, self_names=["10.0.2.100:3128"], limits=limits, **kwargs)
        host, port = server.listen_tcp()
        server.start()
        started.append((server, log))
        server.address = (host, port)
        return server

    yield make
    for server, log in started:
        server.close()
        log.close()


def exchange(address, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the proxy closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def events(tmp_path) -> list[dict]:
    return list(read_events(tmp_path / "proxy.log"))


def wait_events(tmp_path, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        found = events(tmp_path)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_absolute_uri_to_an_allowed_entry_is_forwarded_in_origin_form(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/pkg?x=1 HTTP/1.1\r\n"
                                     f"Host: 127.0.0.1:{upstream.port}\r\nProxy-Connection: keep-alive\r\n"
                                     f"Proxy-Authorization: Basic Zm9v\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.") and answer.endswith(b"ok /pkg?x=1")
    seen = upstream.requests[-1]
    assert seen["path"] == "/pkg?x=1"
    assert "proxy-authorization" not in seen["headers"] and "proxy-connection" not in seen["headers"]
    assert seen["headers"]["connection"] == "close"
    [event] = wait_events(tmp_path, 1)
    assert (event["method"], event["host"], event["port"], event["decision"]) == ("GET", "127.0.0.1", upstream.port, "allow")
    assert event["rule"] == f"127.0.0.1:{upstream.port}" and event["bytes"] > len(b"ok /pkg?x=1")
    assert proxy.allowed == 1 and not proxy.denied


def test_connect_to_an_allowed_entry_tunnels(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode())
        assert sock.recv(4096) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(b"GET /through HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.endswith(b"ok /through")
    [event] = wait_events(tmp_path, 1)
    assert event["method"] == "CONNECT" and event["decision"] == "allow" and event["bytes"] > 0


@pytest.mark.parametrize("request_line", ["CONNECT 127.0.0.1:{other} HTTP/1.1", "GET http://127.0.0.1:{other}/ HTTP/1.1"])
def test_a_port_not_on_the_list_is_refused_with_the_rule_and_the_flag(make_proxy, upstream, tmp_path, request_line):
    other = closed_port()
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    answer = exchange(proxy.address, (request_line.format(other=other) + "\r\n\r\n").encode()).decode()
    assert answer.startswith("HTTP/1.1 403 Forbidden")
    assert "not on the allowlist (claude.allow, --allow)" in answer
    assert f"To allow it: inv claude --allow 127.0.0.1:{other}" in answer
    [event] = wait_events(tmp_path, 1)
    assert (event["host"], event["port"], event["decision"], event["bytes"]) == ("127.0.0.1", other, "deny", 0)
    assert proxy.denied == {(f"127.0.0.1:{other}", event["rule"]): 1}
    assert not upstream.requests


def test_host_header_mismatch_is_refused(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/ HTTP/1.1\r\nHost: evil.example\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"Host header mismatch" in answer
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: evil.example:443\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403") and b"Host header mismatch" in answer
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                                     f"Host: evil.example\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 403")
    assert not upstream.requests
    assert [e["rule"] for e in wait_events(tmp_path, 3)][:1] == ["Host header mismatch: it names another host than the request"]


def test_a_listed_name_that_resolves_to_loopback_is_refused(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"localhost:{upstream.port}", f"*.example.test:{upstream.port}"],
                       resolver=lambda host, port: ["127.0.0.1"])
    for host in ("localhost", "sneaky.example.test"):
        answer = exchange(proxy.address, f"CONNECT {host}:{upstream.port} HTTP/1.1\r\n\r\n".encode()).decode()
        assert answer.startswith("HTTP/1.1 403")
        assert f"{host} resolves to 127.0.0.1, an address of this host" in answer
        assert f"--allow 127.0.0.1:{upstream.port}" in answer
    assert not upstream.requests
    assert all(e["decision"] == "deny" for e in wait_events(tmp_path, 2))


def test_ip_literals_need_an_ip_entry(make_proxy, upstream):
    proxy = make_proxy([f"localhost:{upstream.port}"])
    for target in (f"127.0.0.1:{upstream.port}", f"[::1]:{upstream.port}", f"2130706433:{upstream.port}"):
        answer = exchange(proxy.address, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith((b"HTTP/1.1 403", b"HTTP/1.1 400")), answer
    assert not upstream.requests


def test_https_in_a_request_line_and_other_forms_are_refused(make_proxy, upstream):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    for head in (f"GET https://127.0.0.1:{upstream.port}/ HTTP/1.1", f"GET ftp://127.0.0.1:{upstream.port}/ HTTP/1.1",
                 f"GET http://user@127.0.0.1:{upstream.port}/ HTTP/1.1", "OPTIONS * HTTP/1.1",
                 "CONNECT 127.0.0.1 HTTP/1.1", "GARBAGE", "GET / HTTP/9.9"):
        answer = exchange(proxy.address, (head + "\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 4"), (head, answer)
    assert not upstream.requests


def test_an_upstream_that_refuses_is_a_502_and_logged(make_proxy, tmp_path):
    port = closed_port()
    proxy = make_proxy([f"127.0.0.1:{port}"])
    answer = exchange(proxy.address, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502")
    [event] = wait_events(tmp_path, 1)
    assert event["decision"] == "fail" and "upstream connection failed" in event["rule"]


# --------------------------------------------------------------------------- the API endpoint


def test_the_api_endpoint_replaces_the_placeholder_with_the_real_key(make_proxy, upstream, tmp_path):
    proxy = make_proxy([])
    body = b'{"model": "m", "messages": []}'
    answer = exchange(proxy.address, b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: 10.0.2.100:3128\r\n"
                                     b"x-api-key: " + PLACEHOLDER.encode() + b"\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert answer.endswith(b"ok /api/v1/messages?beta=true")
    seen = upstream.requests[-1]
    assert seen["path"] == "/api/v1/messages?beta=true" and seen["body"] == body
    assert seen["headers"]["x-api-key"] == SECRET
    assert seen["headers"]["host"] == f"127.0.0.1:{upstream.port}"
    [event] = wait_events(tmp_path, 1)
    assert event["rule"] == "api endpoint (credential added)" and event["port"] == upstream.port


def test_the_api_endpoint_by_absolute_uri_and_bearer_token(make_proxy, upstream):
    proxy = make_proxy([], credentials=Credentials(oauth_token=TOKEN))
    exchange(proxy.address, f"POST http://10.0.2.100:3128/v1/messages HTTP/1.1\r\nHost: 10.0.2.100:3128\r\n"
                            f"Authorization: Bearer {PLACEHOLDER}\r\nContent-Length: 0\r\n\r\n".encode())
    seen = upstream.requests[-1]
    assert seen["path"] == "/api/v1/messages"
    assert seen["headers"]["authorization"] == f"Bearer {TOKEN}" and "x-api-key" not in seen["headers"]


def test_no_credential_is_added_anywhere_but_the_api_endpoint(make_proxy, upstream):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/elsewhere HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                            f"x-api-key: {PLACEHOLDER}\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n".encode())
    seen = upstream.requests[-1]
    assert seen["headers"]["x-api-key"] == PLACEHOLDER
    assert seen["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    assert SECRET not in json.dumps(seen["headers"])


def test_a_streamed_answer_is_relayed_as_it_comes(make_proxy, upstream):
    proxy = make_proxy([])
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 10.0.2.100:3128\r\n\r\n")
        got = b""
        while b"event: one" not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        assert b"event: two" not in got  # the upstream holds the rest until released
        upstream.release.set()
        while chunk := sock.recv(4096):
            got += chunk
    assert got.endswith(b"event: two\n\n")


def test_nothing_secret_in_the_log(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"], credentials=Credentials(api_key=SECRET, oauth_token=TOKEN))
    exchange(proxy.address, f"POST /v1/messages?key={SECRET} HTTP/1.1\r\nx-api-key: {PLACEHOLDER}\r\nContent-Length: 0\r\n\r\n".encode())
    exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/?t={TOKEN} HTTP/1.1\r\n\r\n".encode())
    exchange(proxy.address, f"GET http://{SECRET}.example/ HTTP/1.1\r\n\r\n".encode())
    exchange(proxy.address, f"CONNECT evil.example:443 HTTP/1.1\r\nProxy-Authorization: Basic {TOKEN}\r\n\r\n".encode())
    proxy.close()
    text = (tmp_path / "proxy.log").read_text()
    assert len(text.splitlines()) == 4
    assert SECRET not in text.replace(f"{SECRET}.example", "") and TOKEN not in text
    assert stat.S_IMODE((tmp_path / "proxy.log").stat().st_mode) == 0o600
    for line in text.splitlines():
        assert set(json.loads(line)) == {"time", "method", "host", "port", "decision", "rule", "bytes"}


# --------------------------------------------------------------------------- bad clients


def test_slow_huge_and_vanishing_clients_do_not_hurt_it(make_proxy, upstream, tmp_path):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"], limits=Limits(head_timeout=0.5, max_head=4096))
    # slow: a head that never ends
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    # huge headers
    answer = exchange(proxy.address, b"GET http://127.0.0.1/ HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431")
    # gone mid-request, and gone in the middle of a tunnel
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:")
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n\r\n".encode())
        sock.recv(4096)
        sock.sendall(b"GET /half")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    # still serving
    answer = exchange(proxy.address, f"GET http://127.0.0.1:{upstream.port}/after HTTP/1.1\r\n\r\n".encode())
    assert answer.endswith(b"ok /after")
    rules = [e["rule"] for e in wait_events(tmp_path, 5)]
    assert any("not complete within" in r for r in rules) and any("over 4096 bytes" in r for r in rules)
    assert "client closed before the request head ended" in rules


def test_connections_are_bounded(make_proxy, upstream):
    proxy = make_proxy([], limits=Limits(max_clients=2, head_timeout=5))
    held = [socket.create_connection(proxy.address, timeout=10) for _ in range(2)]
    try:
        deadline = time.monotonic() + 5
        while True:  # the third is answered 503 once both slots are taken
            answer = exchange(proxy.address, b"")
            if answer.startswith(b"HTTP/1.1 503") or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert answer.startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # slots come back
        try:
            answer = exchange(proxy.address, b"GET /back HTTP/1.1\r\n\r\n")
        except ConnectionResetError:  # a 503 racing the request
            answer = b""
        if answer.endswith(b"ok /api/back") or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert answer.endswith(b"ok /api/back")


def test_close_ends_open_tunnels(make_proxy, upstream):
    proxy = make_proxy([f"127.0.0.1:{upstream.port}"])
    sock = socket.create_connection(proxy.address, timeout=10)
    sock.sendall(f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    proxy.close()
    assert time.monotonic() - start < 5
    assert sock.recv(4096) == b""
    sock.close()


def test_unix_socket_is_private_and_replaces_a_stale_one(tmp_path):
    path = tmp_path / "proxy.sock"
    path.write_text("stale")
    log = ProxyLog(None)
    server = ProxyServer(Allowlist([]), log)
    server.listen_unix(path)
    with server:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 403")


def test_log_rotates_when_large(tmp_path):
    path = tmp_path / "proxy.log"
    path.write_bytes(b"x" * 100)
    ProxyLog(path, max_bytes=50).close()
    assert (tmp_path / "proxy.log.1").read_bytes() == b"x" * 100
    assert path.read_bytes() == b""
    assert list(read_events(tmp_path / "missing.log")) == []
    os.chmod(path, 0o644)
    log = ProxyLog(path)
    log.write("GET", "h", 1, "deny", "r")
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [e["rule"] for e in read_events(path)] == ["r"]


def test_an_address_of_the_hosts_own_interfaces_is_local():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only asks for a route
        except OSError:
            pytest.skip("no IPv4 route on this machine")
        mine = probe.getsockname()[0]
    assert local_address(mine)
