"""Pure helpers of the sources: checksum files, validators, registry references and challenges."""

import pytest

from devops_tasks.errors import SourceError
from devops_tasks.sources.cdn import version_from_validator
from devops_tasks.sources.download import origin, redact
from devops_tasks.sources.github import parse_checksums
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
