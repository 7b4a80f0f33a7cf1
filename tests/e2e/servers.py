"""Loopback HTTP servers for the download/source tests: a misbehaving file server, a GitHub
releases API, a real ``docker-registry`` with a push helper, and a registry token server; and the
qcow2 images they serve (a valid one, or one crafted to reach host files).

Every server binds 127.0.0.1 port 0 and is stopped by the test that started it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from email.utils import formatdate
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlsplit

import requests

from helpers import free_port

CHUNK = 64 * 1024


@lru_cache(maxsize=1)
def _empty_qcow2() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "empty.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "1M"],
                       check=True, capture_output=True)
        return path.read_bytes()


def qcow2_image(payload: bytes = b"") -> bytes:
    """A self-contained qcow2 (1.8 KB of header and tables, which the install check accepts)
    followed by ``payload``: distinct images of any size for the download tests."""
    return _empty_qcow2() + payload


def crafted_qcow2(folder: Path, *, backing: Optional[Path] = None, data_file: Optional[Path] = None) -> bytes:
    """A qcow2 whose header names a host file as its backing file or external data file, made
    with ``qemu-img`` in ``folder`` (``data_file`` must not exist yet: qemu-img creates it)."""
    path = Path(folder) / "crafted.qcow2"
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-F", "raw", "-b", str(backing)]
    if data_file is not None:
        args += ["-o", f"data_file={data_file}"]
    subprocess.run([*args, str(path), "1M"], check=True, capture_output=True)
    data = path.read_bytes()
    path.unlink()
    return data


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until true or raise after ``timeout`` seconds (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached within {timeout}s")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hanging up on purpose: not news
        pass


class FileServer:
    """Serves ``files`` (path → bytes) with strong ETags and Last-Modified, honouring ``Range`` and
    ``If-Range`` -- unless told to misbehave:

    * ``cuts``: absolute offsets; a response covering one sends up to it and drops the connection
      (each offset used once);
    * ``ignore_range``: always answer 200 with the whole file;
    * ``answer_416``: how many range requests get a 416;
    * ``bad_content_range``: a range request gets a 206 whose Content-Range starts elsewhere;
    * ``status``: path → forced status (404, 500, ...);
    * ``stall``: (offset, seconds, times): stop sending at ``offset`` for ``seconds``, ``times`` times
      (only for ``stall_path`` when set);
    * ``etag`` / ``last_modified``: send these validators;
    * ``routes``: path → callable(handler) for JSON endpoints and redirects.

    ``sent`` counts body bytes written; ``log`` keeps (method, path, headers) of every request.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mtimes: dict[str, float] = {}
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.cuts: list[int] = []
        self.ignore_range = False
        self.answer_416 = 0
        self.bad_content_range = False
        self.status: dict[str, int] = {}
        self.stall: Optional[list] = None
        self.stall_path: Optional[str] = None  # None: every file
        self.etag = True
        self.last_modified = True
        self.sent = 0
        self.sent_by: dict[str, int] = {}
        self.log: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.httpd: Optional[ThreadingHTTPServer] = None

    # -- content -----------------------------------------------------------------------------
    def put(self, path: str, data: bytes) -> None:
        self.files[path] = data
        self.mtimes[path] = time.time() + len(self.mtimes)  # distinct Last-Modified per version

    def put_json(self, path: str, obj) -> None:
        self.put(path, json.dumps(obj).encode())

    def oversized(self, path: str, size: int, declare_length: bool = False, status: int = 200) -> None:
        """Answer ``path`` with ``size`` bytes of JSON-looking padding, streamed until the client
        hangs up, without a Content-Length unless ``declare_length``; ``sent_by[path]`` counts
        what was written."""

        def handle(h) -> None:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            if declare_length:
                h.send_header("Content-Length", str(size))
            else:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            if h.command == "HEAD":
                return
            written = 0
            chunk = b"[" + b" " * (CHUNK - 1)
            while written < size:
                if not self._write(h, chunk[: size - written], path):
                    return
                written += min(CHUNK, size - written)

        self.routes[path] = handle

    def etag_of(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'

    def modified_of(self, path: str) -> str:
        return formatdate(self.mtimes[path], usegmt=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def requests_for(self, path: str) -> list[dict]:
        return [headers for method, p, headers in self.log if p == path]

    # -- life --------------------------------------------------------------------------------
    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- request handling --------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        with self.lock:
            self.log.append((h.command, path, dict(h.headers)))
        if path in self.status:
            self._plain(h, self.status[path], b"forced error\n")
            return
        if path in self.routes:
            self.routes[path](h)
            return
        if path not in self.files:
            self._plain(h, 404, b"not found\n")
            return
        data = self.files[path]
        size = len(data)
        etag, modified = self.etag_of(path), self.modified_of(path)
        start, status = 0, 200
        rng = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if rng and not self.ignore_range and (not if_range or if_range in (etag, modified)):
            first = int(rng.split("=", 1)[1].split("-", 1)[0])
            if first >= size or self.answer_416 > 0:
                with self.lock:
                    self.answer_416 = max(0, self.answer_416 - 1)
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            start, status = first, 206
        h.send_response(status)
        if status == 206:
            claimed = start + 1 if self.bad_content_range else start
            h.send_header("Content-Range", f"bytes {claimed}-{size - 1}/{size}")
        h.send_header("Content-Length", str(size - start))
        h.send_header("Accept-Ranges", "bytes")
        if self.etag:
            h.send_header("ETag", etag)
        if self.last_modified:
            h.send_header("Last-Modified", modified)
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        if head:
            return
        self._send_body(h, data, start, path)

    def _send_body(self, h, data: bytes, start: int, path: str) -> None:
        pos, end = start, len(data)
        while pos < end:
            stop = min(pos + CHUNK, end)
            with self.lock:
                cut = next((c for c in sorted(self.cuts) if pos < c <= stop), None)
                if cut is not None:
                    self.cuts.remove(cut)
                stall = None
                if (self.stall and self.stall[2] > 0 and pos <= self.stall[0] < stop
                        and self.stall_path in (None, path)):
                    stall = self.stall[1]
                    self.stall[2] -= 1
            if stall is not None:
                piece = data[pos : self.stall[0]]
                self._write(h, piece, path)
                time.sleep(stall)
                h.close_connection = True
                self._drop(h)
                return
            if cut is not None:
                self._write(h, data[pos:cut], path)
                h.close_connection = True
                self._drop(h)
                return
            if not self._write(h, data[pos:stop], path):
                return
            pos = stop

    def _write(self, h, piece: bytes, path: str) -> bool:
        try:
            h.wfile.write(piece)
            h.wfile.flush()
        except OSError:
            h.close_connection = True
            return False
        with self.lock:
            self.sent += len(piece)
            self.sent_by[path] = self.sent_by.get(path, 0) + len(piece)
        return True

    @staticmethod
    def _drop(h) -> None:
        try:
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _plain(h, status: int, body: bytes, headers: Optional[dict] = None) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def reply_json(h, obj, status: int = 200) -> None:
        FileServer._plain(h, status, json.dumps(obj).encode(), {"Content-Type": "application/json"})


class GitHubAPI:
    """A releases API (``/repos/{repo}/releases/latest`` and ``/repos/{repo}/releases/assets/{id}``)
    on one server, redirecting asset downloads (302) to a second server that holds the bytes."""

    def __init__(self, repo: str, token: str):
        self.repo = repo
        self.token = token
        self.api = FileServer()
        self.downloads = FileServer()
        self.release: dict = {}
        self.assets: dict[int, str] = {}  # id → path on the download server

    def start(self) -> "GitHubAPI":
        self.api.start()
        self.downloads.start()
        self.api.routes[f"/repos/{self.repo}/releases/latest"] = self._latest
        return self

    def stop(self) -> None:
        self.api.stop()
        self.downloads.stop()

    def publish(self, tag: str, files: dict[str, bytes], digest: bool = True) -> None:
        """Make a release ``tag`` with these assets the latest one."""
        assets = []
        for index, (name, data) in enumerate(sorted(files.items())):
            asset_id = len(self.assets) + 1
            path = f"/{self.repo}/releases/download/{tag}/{name}"
            self.downloads.put(path, data)
            self.assets[asset_id] = path
            self.api.routes[f"/repos/{self.repo}/releases/assets/{asset_id}"] = self._asset(asset_id)
            asset = {
                "id": asset_id,
                "name": name,
                "size": len(data),
                "url": f"{self.api.url}/repos/{self.repo}/releases/assets/{asset_id}",
                "browser_download_url": f"{self.downloads.url}{path}",
            }
            if digest:
                asset["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
            assets.append(asset)
        self.release = {"tag_name": tag, "name": tag, "assets": assets}

    def _authorized(self, h) -> bool:
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            FileServer.reply_json(h, {"message": "Bad credentials"}, 401)
            return False
        return True

    def _latest(self, h) -> None:
        if not self._authorized(h):
            return
        if not self.release:
            FileServer.reply_json(h, {"message": "Not Found"}, 404)
            return
        FileServer.reply_json(h, self.release)

    def _asset(self, asset_id: int):
        def handle(h) -> None:
            if not self._authorized(h):
                return
            if h.headers.get("Accept") != "application/octet-stream":
                FileServer.reply_json(h, {"id": asset_id})
                return
            target = f"{self.downloads.url}{self.assets[asset_id]}?X-Signature=secret-signature"
            FileServer._plain(h, 302, b"", {"Location": target})

        return handle


# -- a real OCI registry -----------------------------------------------------------------------
class Registry:
    """``docker-registry serve CONFIG`` on a free loopback port with storage in ``root``."""

    def __init__(self, root: Path, auth: Optional[dict] = None):
        self.root = Path(root)
        self.port = free_port()
        self.auth = auth
        self.proc: Optional[subprocess.Popen] = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "Registry":
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "version": 0.1,
            "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "test-secret"},
        }
        if self.auth:
            config["auth"] = self.auth
        path = self.root / "config.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = open(self.root / "registry.log", "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(path)], stdout=self.log, stderr=self.log)
        wait_until(self._ready, 15, f"docker-registry on {self.host}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-2000:]}")
        return requests.get(f"{self.url}/v2/", timeout=1).status_code in (200, 401)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


def push_artifact(
    base_url: str,
    repo: str,
    tag: str,
    data: bytes,
    title: str,
    session: Optional[requests.Session] = None,
    extra_layers: Optional[dict[str, bytes]] = None,
) -> str:
    """Push ``data`` as an OCI artifact layer titled ``title`` (monolithic uploads); returns the
    manifest digest."""
    s = session or requests.Session()

    def upload(blob: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        start = s.post(f"{base_url}/v2/{repo}/blobs/uploads/", timeout=30)
        assert start.status_code == 202, (start.status_code, start.text)
        location = start.headers["Location"]
        if location.startswith("/"):
            location = base_url + location
        sep = "&" if "?" in location else "?"
        done = s.put(
            f"{location}{sep}digest={digest}",
            data=blob,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(blob))},
            timeout=60,
        )
        assert done.status_code == 201, (done.status_code, done.text)
        return digest

    config = b"{}"
    config_digest = upload(config)
    layers = []
    for name, blob in [(title, data), *sorted((extra_layers or {}).items())]:
        layers.append(
            {
                "mediaType": "application/vnd.core.devops.image.layer.v1+qcow2",
                "digest": upload(blob),
                "size": len(blob),
                "annotations": {"org.opencontainers.image.title": name},
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.core.devops.image.v1",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": layers,
    }
    body = json.dumps(manifest).encode()
    resp = s.put(
        f"{base_url}/v2/{repo}/manifests/{tag}",
        data=body,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    assert resp.status_code == 201, (resp.status_code, resp.text)
    return "sha256:" + hashlib.sha256(body).hexdigest()


class TokenServer:
    """The registry token flow (what ghcr.io and Docker Hub do): ``GET /token?service=&scope=``
    answers a JWT signed with a key whose certificate the registry trusts. ``users`` maps user →
    password for basic auth on the token endpoint; ``anonymous`` grants pull without one."""

    def __init__(self, root: Path, service: str = "test-registry", users: Optional[dict] = None, anonymous=True):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import datetime as dt

        self.service = service
        self.users = users or {}
        self.anonymous = anonymous
        self.issued: list[dict] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token issuer")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.server = FileServer()
        self.server.routes["/token"] = self._token

    def start(self) -> "TokenServer":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def registry_auth(self) -> dict:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": "test-issuer",
                "rootcertbundle": str(self.bundle),
            }
        }

    def _jwt(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(raw: bytes) -> str:
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{b64(signature)}"

    def _token(self, h) -> None:
        query = parse_qs(urlsplit(h.path).query)
        user = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != password:
                FileServer.reply_json(h, {"details": "bad credentials"}, 401)
                return
        elif not self.anonymous:
            FileServer.reply_json(h, {"details": "credentials required"}, 401)
            return
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            allowed = actions.split(",") if user else [a for a in actions.split(",") if a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {
            "iss": "test-issuer",
            "sub": user,
            "aud": query.get("service", [""])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        self.issued.append({"user": user, "scope": query.get("scope", [])})
        FileServer.reply_json(h, {"token": self._jwt(claims), "expires_in": 300})
