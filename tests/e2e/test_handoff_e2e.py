"""The guest trusts what the host trusts and uses the host's proxy, against real servers.

The test makes its own CA, runs an HTTPS server signed by it and an HTTP CONNECT proxy on this
machine's loopback, and boots the ``minimal`` image with ``vm.ca_bundle`` naming that CA and
``HTTPS_PROXY`` pointing at the proxy. The guest's Python fetches a page by a name only the proxy
knows: that works only if the proxy setting arrived (rewritten to the host's address in the
guest) and the CA is trusted. A second boot with ``vm.trust_host_ca: false`` and no proxy fails
verification, and nothing of the first boot is left in the guest.

Also here, on the same guest: a project symlink whose target holds ``..`` reads through the mount.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DEVOPS = str(BIN / "devops")
SECRET_NAME = "devops-test.invalid"  # resolved by the proxy only
PAGE = b"hello through the host's proxy, signed by the host's CA\n"


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devops-tasks test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SECRET_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SECRET_NAME),
                                                        x509.IPAddress(ipaddress.ip_address("10.0.2.2"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class HttpsServer:
    def __init__(self, cert: Path, key: Path):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that knows one name (``SECRET_NAME`` -> 127.0.0.1) and
    refuses everything else (no test goes to the internet through it). ``seen`` lists the targets."""

    def __init__(self):
        proxy = self
        self.seen: list[str] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                method, target, _ = data.split(b"\r\n", 1)[0].decode().split(" ", 2)
                proxy.seen.append(f"{method} {target}")
                host, _, port = target.rpartition(":")
                if method != "CONNECT" or host != SECRET_NAME:
                    self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as upstream:
                    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    pipe(self.request, upstream)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def pipe(a: socket.socket, b: socket.socket) -> None:
    while True:
        ready, _, _ = select.select([a, b], [], [], 60)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            (b if sock is a else a).sendall(data)


@pytest.fixture
def core(tmp_path, built_image, monkeypatch):
    """A CORE_HOME with the minimal image installed; yields a runner for inv/devops."""
    home, images = tmp_path / "core", tmp_path / "images"
    home.mkdir()
    images.mkdir()
    (images / "core-devops-linux-amd64.qcow2").symlink_to(built_image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="v0-handoff", source="build", guest_contract=1))
    manifest.save()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "SSH_AUTH_SOCK"}
    env.update(CORE_HOME=str(home), CORE_IMAGES_DIR=str(images))
    for key in ("CORE_HOME", "CORE_IMAGES_DIR"):
        monkeypatch.setenv(key, env[key])

    class Core:
        def config(self, text: str) -> None:
            (home / "config.yaml").write_text(f"vm:\n  ssh_port: {free_port()}\n  memory: 512\n  cpus: 2\n"
                                              f"  boot_timeout: 180\n{text}")

        def run(self, *args, cwd=None, timeout=300, **extra):
            return subprocess.run(list(args), cwd=cwd or tmp_path, env={**env, **extra}, capture_output=True,
                                  text=True, timeout=timeout, stdin=subprocess.DEVNULL)

        def guest(self, script: str, timeout=120):
            return self.run(DEVOPS, "shell", "--", "sh", "-c", script, timeout=timeout)

    runner = Core()
    try:
        yield runner
    finally:
        runner.run(DEVOPS, "vm.stop", timeout=120)


FETCH = ("python3 -c 'import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=60).read().decode(), end=\"\")' ")


def test_the_guest_trusts_the_host_ca_and_uses_its_proxy_then_forgets_both(core, tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    with HttpsServer(cert, key) as https, ConnectProxy() as proxy:
        core.config(f"  ca_bundle: {ca}\n")
        boot = core.run(DEVOPS, "vm.boot", HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}", NO_PROXY="example.com")
        assert boot.returncode == 0, boot.stdout + boot.stderr
        env = core.guest("echo \"$https_proxy|$HTTPS_PROXY|$no_proxy\"")
        assert env.stdout.strip() == (f"http://10.0.2.2:{proxy.port}|http://10.0.2.2:{proxy.port}|"
                                      "example.com,localhost,127.0.0.1,::1"), env.stderr
        got = core.guest(FETCH + f"https://{SECRET_NAME}:{https.port}/hello")
        assert got.returncode == 0, got.stderr
        assert got.stdout.encode() == PAGE
        assert proxy.seen == [f"CONNECT {SECRET_NAME}:{https.port}"]
        bundle = core.guest("grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; "
                            "readlink /etc/ssl/certs/ca-certificates.crt; grep -c BEGIN /run/host/extra-ca-certificates.crt")
        assert bundle.stdout.split() == ["1", "/run/host/ca-certificates.crt", "1"], "the test CA only: minimal has none"

        assert core.run(DEVOPS, "vm.stop").returncode == 0
        core.config("  trust_host_ca: false\n")  # and no proxy in the environment
        boot = core.run(DEVOPS, "vm.boot")
        assert boot.returncode == 0, boot.stdout + boot.stderr
        refused = core.guest(FETCH + f"https://10.0.2.2:{https.port}/hello")
        assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        line = ca.read_text().splitlines()[1]  # a line of the CA's base64: on the disk, anywhere?
        left = core.guest("cat /etc/ssl/certs/ca-certificates.crt /run/host/env 2>/dev/null; env | grep -i proxy; "
                          f"grep -rlF '{line}' /etc /root /var /usr/lib/devops-tasks /home 2>/dev/null; true")
        assert left.returncode == 0 and left.stdout.strip() == "", "nothing of the first boot's CA or proxy is left"
        assert proxy.seen == [f"CONNECT {SECRET_NAME}:{https.port}"]


def test_a_relative_symlink_with_dotdot_reads_through_the_mount(core, tmp_path):
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "target.txt").write_text("reached\n")
    (project / "sub" / "link").symlink_to("../target.txt")
    core.config("")
    assert core.run(DEVOPS, "vm.boot").returncode == 0
    result = core.run(DEVOPS, "test", "--", "sh", "-c", "readlink sub/link && cat sub/link", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-2:] == ["../target.txt", "reached"]
