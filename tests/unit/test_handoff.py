"""What the host hands the guest at boot: its extra CA certificates and its proxy settings.

Real certificates (made with openssl here) and real files; the guest side is in the e2e tests.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from devops_tasks import handoff
from devops_tasks.config import Config
from devops_tasks.errors import ConfigError
from devops_tasks.machine.qemu import MachineSpec, build_argv

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_cert(tmp_path: Path, name: str) -> bytes:
    """A self-signed CA certificate (PEM) and nothing else."""
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return cert.read_bytes()


def der(pem: bytes) -> bytes:
    body = pem.split(b"-----BEGIN CERTIFICATE-----")[1].split(b"-----END CERTIFICATE-----")[0]
    return base64.b64decode(b"".join(body.split()))


@pytest.fixture
def certs(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    return {name: make_cert(tmp_path, name) for name in ("public1", "public2", "corp")}


# -- certificates ------------------------------------------------------------------------------

def test_only_certificate_blocks_leave_the_host(certs, tmp_path):
    private_key = (tmp_path / "corp.key").read_bytes()
    broken = b"-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n"
    bundle = b"# a comment\n" + certs["corp"] + private_key + broken + certs["public1"] + certs["corp"]
    found = handoff.certificates(bundle)
    assert found == [der(certs["corp"]), der(certs["public1"])], "each certificate once, in order"
    written = handoff.to_pem(found)
    assert b"PRIVATE KEY" not in written and b"comment" not in written
    assert handoff.certificates(written) == found
    check = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=written, capture_output=True)
    assert check.returncode == 0 and b"CN = corp" in check.stdout


def test_extras_are_the_host_bundle_minus_the_public_ones(certs, tmp_path):
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(certs["public1"] + certs["corp"] + certs["public2"])
    public = {der(certs["public1"]), der(certs["public2"])}
    extra, source = handoff.extra_certificates(environ={"SSL_CERT_FILE": str(bundle)}, public=public)
    assert extra == [der(certs["corp"])] and source == bundle
    assert handoff.extra_certificates(False, environ={"SSL_CERT_FILE": str(bundle)}, public=public) == ([], None)


def test_a_configured_bundle_is_used_instead_and_checked(certs, tmp_path):
    mine = tmp_path / "mine.pem"
    mine.write_bytes(certs["corp"])
    extra, source = handoff.extra_certificates(ca_bundle=str(mine), environ={}, public=set())
    assert extra == [der(certs["corp"])] and source == mine
    with pytest.raises(ConfigError, match=r"^vm.ca_bundle: cannot read .*nope.pem: No such file"):
        handoff.extra_certificates(ca_bundle=str(tmp_path / "nope.pem"), environ={}, public=set())
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ConfigError, match=r"vm.ca_bundle: .*empty.pem holds no PEM certificate"):
        handoff.extra_certificates(ca_bundle=str(empty), environ={}, public=set())


def test_host_bundle_prefers_what_the_environment_names(tmp_path):
    named = tmp_path / "named.crt"
    named.write_text("x")
    assert handoff.host_bundle({"REQUESTS_CA_BUNDLE": str(named)}) == named
    assert handoff.host_bundle({"SSL_CERT_FILE": str(tmp_path / "missing")}) != tmp_path / "missing"


def test_public_certificates_include_certifi_and_debian(certs, tmp_path):
    import certifi

    debian = tmp_path / "mozilla"
    debian.mkdir()
    (debian / "Corp.crt").write_bytes(certs["corp"])
    known = handoff.public_certificates(str(debian))
    assert der(certs["corp"]) in known
    assert handoff.certificates(Path(certifi.where()).read_bytes())[0] in known


# -- proxy settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("host, guest", [
    ("http://127.0.0.1:3128", "http://10.0.2.2:3128"),
    ("http://localhost:3128/", "http://10.0.2.2:3128/"),
    ("http://user:p%40ss@127.0.0.2:8080", "http://user:p%40ss@10.0.2.2:8080"),
    ("http://[::1]:3128", "http://10.0.2.2:3128"),
    ("127.0.0.1:3128", "http://10.0.2.2:3128"),
    ("http://proxy.corp.example:3128", "http://proxy.corp.example:3128"),
    ("socks5h://127.0.0.1:1080", "socks5h://10.0.2.2:1080"),
])
def test_a_proxy_on_the_host_loopback_is_reached_at_the_host_address(host, guest):
    env = handoff.guest_proxy_env({"HTTPS_PROXY": host})
    assert env["https_proxy"] == env["HTTPS_PROXY"] == guest


def test_proxy_variables_both_spellings_lower_case_first_and_no_proxy_covers_the_guest():
    env = handoff.guest_proxy_env({"http_proxy": "http://a:1", "HTTP_PROXY": "http://b:2",
                                   "NO_PROXY": "example.com, .corp,localhost", "PATH": "/bin"})
    assert env == {
        "http_proxy": "http://a:1", "HTTP_PROXY": "http://a:1",
        "no_proxy": "example.com,.corp,localhost,127.0.0.1,::1",
        "NO_PROXY": "example.com,.corp,localhost,127.0.0.1,::1",
    }
    assert handoff.guest_proxy_env({"PATH": "/bin", "HOME": "/root"}) == {}
    assert handoff.guest_proxy_env({"no_proxy": "x"}) == {"no_proxy": "x", "NO_PROXY": "x"}
    assert handoff.guest_proxy_env({"https_proxy": "http://a:1\nrm -rf /"}) == {}


def test_env_file_is_quoted_for_the_shell(tmp_path):
    text = handoff.env_file({"https_proxy": "http://u:it's$x@h:1"})
    script = tmp_path / "env"
    script.write_bytes(text)
    out = subprocess.run(["sh", "-c", f'. "{script}"; printf %s "$https_proxy"'], capture_output=True, text=True)
    assert out.stdout == "http://u:it's$x@h:1"


# -- the files and QEMU's arguments ------------------------------------------------------------

def test_boot_files_are_private_and_a_boot_without_them_removes_them(certs, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(certs["corp"])
    monkeypatch.setattr(handoff, "public_certificates", lambda *a: set())
    folder = tmp_path / "vm"
    folder.mkdir()
    environ = {"SSL_CERT_FILE": str(bundle), "https_proxy": "http://127.0.0.1:9"}
    files = handoff.boot_files(folder, environ=environ)
    assert [name for name, _ in files] == ["ca-certificates.crt", "env"]
    for _, path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert handoff.certificates(files[0][1].read_bytes()) == [der(certs["corp"])]
    assert b"export https_proxy=http://10.0.2.2:9\n" in files[1][1].read_bytes()
    argv = build_argv(MachineSpec(name="x", arch="amd64", accel="tcg", memory=512, cpus=1, disk=folder / "d",
                                  pidfile=folder / "p", qmp_socket=folder / "q", serial_socket=folder / "s",
                                  serial_log=folder / "l", ssh_port=2222, guest_files=files))
    assert f"name=opt/devops-tasks/ca-certificates.crt,file={folder}/guest-ca-certificates.crt" in argv
    assert f"name=opt/devops-tasks/env,file={folder}/guest-env" in argv
    assert handoff.boot_files(folder, trust_host_ca=False, environ={}) == ()
    assert not list(folder.iterdir()), "files of an earlier boot are gone"


def test_config_keys(tmp_path):
    config = Config.from_dict({"vm": {"trust_host_ca": "false", "ca_bundle": "~/corp.pem"}})
    assert config.vm.trust_host_ca is False and config.vm.ca_bundle == "~/corp.pem"
    assert Config().vm.trust_host_ca is True and Config().vm.ca_bundle == ""
    with pytest.raises(ConfigError, match="vm.trust_host_ca: expected true or false"):
        Config.from_dict({"vm": {"trust_host_ca": "maybe"}}, origin="cfg")


def test_boot_refuses_a_broken_ca_bundle_before_starting_anything(tmp_path, monkeypatch):
    """The bad-input rule: one line naming the key, and no QEMU, record or key written."""
    from devops_tasks import lifecycle
    from devops_tasks.machine import process
    from devops_tasks.manifest import ImageInfo, Manifest

    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    images = tmp_path / "images"
    images.mkdir()
    (images / "core-devops-linux-amd64.qcow2").write_bytes(b"QFI\xfb")
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="v1", source="build", guest_contract=1))
    manifest.save()
    started = []
    monkeypatch.setattr(lifecycle, "qemu_binary", lambda arch: "/bin/false")
    monkeypatch.setattr(process, "start", lambda *a, **k: started.append(a))
    config = Config.from_dict({"vm": {"ca_bundle": str(tmp_path / "missing.pem")}})
    with pytest.raises(ConfigError, match="vm.ca_bundle: cannot read"):
        lifecycle.VM("core-dev", config, echo=lambda line: None).boot()
    assert started == []
    vm_dir = tmp_path / "core" / "vms" / "core-dev"
    assert not (vm_dir / "record.json").exists() and not (vm_dir / "overlay.qcow2").exists()
    assert not os.path.exists(tmp_path / "core" / "known_hosts") or "2222" not in (tmp_path / "core" / "known_hosts").read_text()


def test_guest_file_names_are_checked():
    from devops_tasks.errors import VMError

    base = dict(name="x", arch="amd64", accel="tcg", memory=512, cpus=1, disk=Path("/d"), pidfile=Path("/p"),
                qmp_socket=Path("/q"), serial_socket=Path("/s"), serial_log=Path("/l"), ssh_port=2222)
    argv = build_argv(MachineSpec(**base, guest_files=(("env", Path("/v,1/env")),)))
    assert "name=opt/devops-tasks/env,file=/v,,1/env" in argv
    for bad in ("../x", "a,b", "", "x" * 40, "a/b"):
        with pytest.raises(VMError, match="invalid fw_cfg file name"):
            build_argv(MachineSpec(**base, guest_files=((bad, Path("/f")),)))
