"""Helpers of the sources: checksum files, validators, URL rules, registry references and
challenges, and the qcow2 check (with real qemu-img)."""

import subprocess

import pytest

from devops_tasks.errors import ImageError, SourceError
from devops_tasks.sources.cdn import version_from_validator
from devops_tasks.sources.github import parse_checksums
from devops_tasks.sources.http import check_url, is_loopback, origin, redact
from devops_tasks.sources.qcow2 import check_image, unsafe_reason
from devops_tasks.sources.registry import _challenge, highest_version, parse_reference, version_key

HEX_A, HEX_B = "a" * 64, "B" * 64


def test_parse_checksums():
    text = f"{HEX_A}  other.qcow2\n{HEX_B} *dir/img.qcow2\n"
    assert parse_checksums(text, "img.qcow2") == HEX_B.lower()
    assert parse_checksums(text, "missing.qcow2") == ""
    assert parse_checksums(f"{HEX_A}\n", "img.qcow2") == HEX_A  # a lone <asset>.sha256
    assert parse_checksums(f"SHA256 (img.qcow2) = {HEX_A}\n", "img.qcow2") == HEX_A
    assert parse_checksums("# comment\n\n", "img.qcow2") == ""


def test_version_from_validator():
    assert version_from_validator('"5f3a-1b2c"') == "5f3a-1b2c"
    assert version_from_validator('W/"weak"') == "weak"
    assert version_from_validator("Wed, 01 May 2024 12:00:00 GMT") == "2024-05-01T12:00:00Z"


def test_origin_and_redact():
    assert origin("https://API.github.com/x") == ("https", "api.github.com", 443)
    assert origin("http://127.0.0.1:8080/a") != origin("http://127.0.0.1:8081/a")
    assert redact("https://s3.example/obj?X-Amz-Signature=secret") == "https://s3.example/obj"


def test_version_tags():
    assert version_key("v1.10.0") == (1, 10, 0)
    assert version_key("latest") is None and version_key("v2.0.0-rc1") is None
    assert highest_version(["v1.9.3", "latest", "v1.10.0", "v1", "1.2"]) == "v1.10.0"
    assert highest_version(["v2", "v1.99.0"]) == "v2"


def test_registry_references():
    ref = parse_reference("ghcr.io/host-uk/core-devops:v1.2.3")
    assert (ref.host, ref.repo, ref.tag, ref.digest) == ("ghcr.io", "host-uk/core-devops", "v1.2.3", "")
    ref = parse_reference("127.0.0.1:5000/a/b@sha256:" + "0" * 64)
    assert ref.host == "127.0.0.1:5000" and ref.digest.startswith("sha256:") and not ref.tag
    with pytest.raises(SourceError, match="empty"):
        parse_reference("  ")
    with pytest.raises(SourceError, match="unsupported digest"):
        parse_reference("ghcr.io/a/b@md5:00")


def test_bearer_challenge():
    scheme, params = _challenge(
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {"realm": "https://ghcr.io/token", "service": "ghcr.io", "scope": "repository:a/b:pull"}
    assert _challenge('Basic realm="x"')[0] == "basic"


def test_plain_http_only_on_loopback():
    for host in ("localhost", "127.0.0.1", "127.8.9.10", "::1"):
        assert is_loopback(host)
    for host in ("10.0.2.2", "example.com", "localhost.example.com", "0.0.0.0", ""):
        assert not is_loopback(host)
    for url in ("https://cdn.example.com/x", "http://127.0.0.1:8080/x", "http://[::1]:5000/v2/",
                "http://localhost/x"):
        check_url(url)
    with pytest.raises(SourceError, match=r"^http://cdn.example.com/images: plain http is refused for images "
                                          r"except on loopback \(127.0.0.0/8, ::1, localhost\): use https; "
                                          r"fix images.cdn.url$"):
        check_url("http://cdn.example.com/images", "images.cdn.url")
    with pytest.raises(SourceError, match="not an https URL"):
        check_url("ftp://cdn.example.com/x")
    with pytest.raises(SourceError, match="not an https URL"):
        check_url("cdn.example.com/x")


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_check_image_accepts_a_self_contained_qcow2(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "ok.qcow2"), "1M")
    check_image(tmp_path / "ok.qcow2")


def test_check_image_refuses_backing_and_data_files_and_other_formats(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(tmp_path / "backed.qcow2"), "1M")
    with pytest.raises(ImageError, match=rf"^img names a backing file '{secret}' .*: refused, nothing was installed$"):
        check_image(tmp_path / "backed.qcow2", name="img")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data'}",
             str(tmp_path / "data.qcow2"), "1M")
    with pytest.raises(ImageError, match="names an external data file"):
        check_image(tmp_path / "data.qcow2")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "raw.img"), "1M")
    with pytest.raises(ImageError, match="is not a qcow2 image .format 'raw'"):
        check_image(tmp_path / "raw.img")
    assert secret.read_text() == "host secret\n"


def test_unsafe_reason_reads_every_field():
    fine = {"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}
    assert unsafe_reason(fine) == ""
    assert "backing file" in unsafe_reason({**fine, "backing-filename": "x"})
    assert "backing file" in unsafe_reason({**fine, "full-backing-filename": "/etc/shadow"})
    assert "data file" in unsafe_reason({"format": "qcow2", "format-specific": {"data": {"data-file": "/x"}}})
    assert "not a qcow2" in unsafe_reason({"format": "vmdk"})
