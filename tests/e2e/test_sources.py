"""The GitHub and registry sources end to end: a local releases API whose asset downloads redirect
to another server, and a real ``docker-registry`` (anonymous, htpasswd and token auth). And what a
hostile server tries: releases without checksums, plain http, endless answers, a crafted qcow2."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
import requests

import needs
from devops_tasks import paths
from devops_tasks.config import Config
from devops_tasks.errors import ChecksumError, ImageError, SourceError
from devops_tasks.images import ImageManager
from devops_tasks.manifest import Manifest
from devops_tasks.sources import SourceConfig
from devops_tasks.sources.registry import RegistrySource

from servers import FileServer, GitHubAPI, Registry, TokenServer, crafted_qcow2, push_artifact, qcow2_image

pytestmark = pytest.mark.e2e

NAME = paths.image_name()
MiB = 1 << 20
CAP = 4 * MiB  # the size cap on answers that are not the image
TOKEN = "ghp_test_token_do_not_leak_0123456789"


@pytest.fixture(autouse=True)
def core_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("CORE_HTTP_READ_TIMEOUT", "5")
    for name in ("GH_TOKEN", "GITHUB_TOKEN", "CORE_REGISTRY_USER", "CORE_REGISTRY_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


# -- GitHub -------------------------------------------------------------------------------------
@pytest.fixture
def github(monkeypatch):
    monkeypatch.setenv("GH_TOKEN", TOKEN)
    gh = GitHubAPI("host-uk/core-images", TOKEN).start()
    yield gh
    gh.stop()


def gh_manager(gh: GitHubAPI, require_checksum: bool = True) -> ImageManager:
    config = Config.from_dict(
        {"images": {"source": "github", "github": {"repo": gh.repo, "api_url": gh.api.url},
                    "require_checksum": require_checksum}}
    )
    return ImageManager(config, echo=lambda _: None, quiet=True)


def test_github_install_redirect_without_token_leak(github):
    data = qcow2_image(os.urandom(3 * MiB))
    github.publish("v1.0.0", {NAME: data, "other.qcow2": b"other"})
    github.downloads.cuts = [MiB, 2 * MiB + 5]
    seen = []
    info = gh_manager(github).install(progress=lambda d, t: seen.append((d, t)))

    assert paths.image_path().read_bytes() == data
    assert (info.version, info.source) == ("v1.0.0", "github")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert seen[-1] == (len(data), len(data))  # the GitHub source reports progress
    api_auth = [h.get("Authorization") for _, _, h in github.api.log]
    assert api_auth and all(a == f"Bearer {TOKEN}" for a in api_auth)
    dl = github.downloads.log
    assert len(dl) == 3 and all("Authorization" not in h for _, _, h in dl)
    assert github.downloads.sent_by[f"/{github.repo}/releases/download/v1.0.0/{NAME}"] == len(data)


def test_github_check_update(github):
    github.publish("v1", {NAME: qcow2_image(b"one" * 100)})
    gh_manager(github).install()
    assert gh_manager(github).check_update() == ("v1", "v1", False)
    github.publish("v2", {NAME: qcow2_image(b"two" * 100)})
    assert gh_manager(github).check_update() == ("v1", "v2", True)
    current, latest, info = gh_manager(github).update()
    assert info.version == "v2" and paths.image_path().read_bytes() == qcow2_image(b"two" * 100)


def test_github_checksums_file(github):
    data = qcow2_image(os.urandom(5000))
    sums = f"{'1' * 64}  other.qcow2\n{hashlib.sha256(data).hexdigest()}  {NAME}\n".encode()
    github.publish("v3", {NAME: data, "SHA256SUMS": sums}, digest=False)
    source = _github_source(github)
    assert source.latest_version() == "v3"
    assert source.expected_sha256 == hashlib.sha256(data).hexdigest()
    gh_manager(github).install()
    assert paths.image_path().read_bytes() == data


def test_github_wrong_checksum_file(github):
    good, evil = qcow2_image(b"good"), qcow2_image(b"evil")
    github.publish("v1", {NAME: good})
    gh_manager(github).install()
    before = (paths.image_path().read_bytes(), paths.manifest_path().read_bytes())
    github.publish("v2", {NAME: evil, f"{NAME}.sha256": hashlib.sha256(good).hexdigest().encode()}, digest=False)
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        gh_manager(github).install()
    assert "X-Signature" not in str(err.value) and "secret-signature" not in str(err.value)
    assert (paths.image_path().read_bytes(), paths.manifest_path().read_bytes()) == before


def test_github_missing_asset(github):
    github.publish("v1", {"core-devops-plan9-mips.qcow2": b"x"})
    with pytest.raises(SourceError, match=f"release v1 of host-uk/core-images has no asset {NAME} .assets: core-devops-plan9-mips.qcow2"):
        gh_manager(github).install()


def test_github_bad_token_error_hides_token(github, monkeypatch):
    monkeypatch.setenv("GH_TOKEN", "wrong-token-value")
    github.publish("v1", {NAME: b"x"})
    with pytest.raises(SourceError, match="HTTP 401 bad credentials; check GH_TOKEN") as err:
        gh_manager(github).install()
    assert "wrong-token-value" not in str(err.value)


def test_github_no_release(github):
    with pytest.raises(SourceError, match="HTTP 404: repo host-uk/core-images has no published release"):
        gh_manager(github).install()


def test_github_unavailable_without_token_or_gh(github, monkeypatch, tmp_path):
    monkeypatch.delenv("GH_TOKEN")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gh here
    with pytest.raises(SourceError, match=r"no image source available \(github: not available \(no GH_TOKEN/GITHUB_TOKEN"):
        gh_manager(github).install()


def test_github_release_without_digest_or_checksums_file_is_refused(github):
    data = qcow2_image(b"unpublished")
    github.publish("v1", {NAME: data, "README.md": b"no sums here"}, digest=False)
    with pytest.raises(ImageError, match=rf"^github publishes no sha256 for {NAME} v1: refusing an unverified image"):
        gh_manager(github).install()
    assert github.downloads.sent == 0
    assert not paths.image_path().exists() and not paths.manifest_path().exists()
    info = gh_manager(github, require_checksum=False).install()
    assert info.verified is False and paths.image_path().read_bytes() == data
    assert Manifest.load().get(NAME).verified is False


def test_github_api_over_plain_http_off_loopback_is_refused(monkeypatch):
    monkeypatch.setenv("GH_TOKEN", TOKEN)
    config = Config.from_dict({"images": {"source": "github", "github": {"api_url": "http://192.0.2.10/api"}}})
    with pytest.raises(SourceError, match=r"http://192.0.2.10/api: plain http is refused .*fix images.github.api_url"):
        ImageManager(config, echo=lambda _: None, quiet=True).install()


def test_github_endless_release_answer_is_cut_off(github):
    path = f"/repos/{github.repo}/releases/latest"
    github.api.oversized(path, 64 * MiB)
    with pytest.raises(SourceError, match=rf"{github.api.url}{path}: the answer is larger than 4 MiB; refusing to read it$"):
        gh_manager(github).install()
    assert github.api.sent_by[path] < CAP + 16 * MiB


def _github_source(gh):
    from devops_tasks.sources.github import GitHubSource

    return GitHubSource(SourceConfig(github_repo=gh.repo, github_api_url=gh.api.url, image_name=NAME, quiet=True))


# -- registry -----------------------------------------------------------------------------------
needs_registry = needs.mark(needs.tool_problem("docker-registry", "docker-registry"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


def reg_manager(image: str) -> ImageManager:
    config = Config.from_dict({"images": {"source": "registry", "registry": {"image": image}}})
    return ImageManager(config, echo=lambda _: None, quiet=True)


@needs_registry
def test_registry_install_and_check_update(registry):
    repo = "core/devops-a"
    one = qcow2_image(os.urandom(2 * MiB))
    push_artifact(registry.url, repo, "v1", one, NAME)
    images = reg_manager(f"{registry.host}/{repo}")
    info = images.install()
    assert (info.version, info.source) == ("v1", "registry")
    assert info.sha256 == hashlib.sha256(one).hexdigest()
    assert paths.image_path().read_bytes() == one
    assert reg_manager(f"{registry.host}/{repo}").check_update() == ("v1", "v1", False)
    push_artifact(registry.url, repo, "v2", qcow2_image(b"two"), NAME)
    assert reg_manager(f"{registry.host}/{repo}").check_update() == ("v1", "v2", True)
    reg_manager(f"{registry.host}/{repo}").update()
    assert Manifest.load().get(NAME).version == "v2" and paths.image_path().read_bytes() == qcow2_image(b"two")


@needs_registry
def test_registry_numeric_tag_order(registry):
    repo = "core/devops-b"
    for tag in ("v1.9.3", "latest", "v1.10.0", "v1", "v2.0.0-rc1", "sha-abc"):
        push_artifact(registry.url, repo, tag, qcow2_image(tag.encode()), NAME)
    info = reg_manager(f"{registry.host}/{repo}").install()
    assert info.version == "v1.10.0" and paths.image_path().read_bytes() == qcow2_image(b"v1.10.0")


@needs_registry
def test_registry_explicit_tag_and_titled_layer(registry):
    repo = "core/devops-c"
    digest = push_artifact(registry.url, repo, "latest", qcow2_image(b"mine"), NAME,
                           extra_layers={"core-devops-darwin-arm64.qcow2": b"not mine", "README": b"hi"})
    info = reg_manager(f"{registry.host}/{repo}:latest").install()
    assert paths.image_path().read_bytes() == qcow2_image(b"mine")
    assert info.version == f"latest@{digest[:19]}"  # never the bare constant "latest"


@needs_registry
def test_registry_errors(registry):
    with pytest.raises(SourceError, match=rf"registry {registry.host}/core/nothing: listing tags: not found \(HTTP 404"):
        reg_manager(f"{registry.host}/core/nothing").install()
    push_artifact(registry.url, "core/devops-d", "latest", b"x", "something-else.qcow2",
                  extra_layers={"more.qcow2": b"y"})
    with pytest.raises(SourceError, match="has no version tag .tags: latest"):
        reg_manager(f"{registry.host}/core/devops-d").install()
    with pytest.raises(SourceError, match=f"no layer titled {NAME} .layers: "):
        reg_manager(f"{registry.host}/core/devops-d:latest").install()
    with pytest.raises(SourceError, match="not found"):
        reg_manager(f"{registry.host}/core/devops-d:v9").install()


@needs_registry
def test_registry_corrupted_blob_is_refused(registry):
    """A blob whose bytes no longer match its digest (disk corruption on the registry side)."""
    repo = "core/devops-e"
    data = os.urandom(MiB)
    push_artifact(registry.url, repo, "v1", data, NAME)
    digest = hashlib.sha256(data).hexdigest()
    blob = registry.root / "data/docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    blob.write_bytes(b"X" + data[1:])
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        reg_manager(f"{registry.host}/{repo}").install()
    assert not paths.image_path().exists() and not paths.manifest_path().exists()


def test_registry_reference_parsing():
    from devops_tasks.sources.registry import highest_version, parse_reference

    ref = parse_reference("ghcr.io/host-uk/core-devops")
    assert (ref.host, ref.repo, ref.tag) == ("ghcr.io", "host-uk/core-devops", "")
    ref = parse_reference("localhost:5000/a/b:v1.2")
    assert (ref.host, ref.repo, ref.tag) == ("localhost:5000", "a/b", "v1.2")
    assert parse_reference("ubuntu").repo == "library/ubuntu"
    assert highest_version(["latest", "v1.9.3", "v1.10.0", "v1", "v2.0.0-rc1"]) == "v1.10.0"
    assert highest_version(["latest"]) is None
    with pytest.raises(SourceError, match="invalid repository name"):
        parse_reference("host.io/UPPER")


@needs_registry
@needs.mark(needs.tool_problem("htpasswd", "apache2-utils"))
def test_registry_basic_auth(tmp_path, monkeypatch):
    htpasswd = subprocess.run(["htpasswd", "-Bbn", "alice", "s3cret"], capture_output=True, text=True, check=True)
    (tmp_path / "htpasswd").write_text(htpasswd.stdout)
    reg = Registry(tmp_path / "reg", auth={"htpasswd": {"realm": "test", "path": str(tmp_path / "htpasswd")}}).start()
    try:
        session = requests.Session()
        session.auth = ("alice", "s3cret")
        push_artifact(reg.url, "core/private", "v1", qcow2_image(b"private"), NAME, session=session)
        with pytest.raises(SourceError, match="needs credentials: set CORE_REGISTRY_USER and CORE_REGISTRY_PASSWORD"):
            reg_manager(f"{reg.host}/core/private").install()
        monkeypatch.setenv("CORE_REGISTRY_USER", "alice")
        monkeypatch.setenv("CORE_REGISTRY_PASSWORD", "wrong")
        with pytest.raises(SourceError, match="access denied") as err:
            reg_manager(f"{reg.host}/core/private").install()
        assert "wrong" not in str(err.value)
        monkeypatch.setenv("CORE_REGISTRY_PASSWORD", "s3cret")
        assert reg_manager(f"{reg.host}/core/private").install().version == "v1"
        assert paths.image_path().read_bytes() == qcow2_image(b"private")
    finally:
        reg.stop()


@needs_registry
def test_registry_token_flow(tmp_path, monkeypatch):
    tokens = TokenServer(tmp_path / "tokens", users={"bob": "pw"}).start()
    reg = Registry(tmp_path / "reg", auth=tokens.registry_auth()).start()
    try:
        repo = "core/tokened"
        # the pusher gets a push token the same way a client would
        challenge = requests.get(f"{reg.url}/v2/", timeout=5)
        assert challenge.status_code == 401 and challenge.headers["WWW-Authenticate"].startswith("Bearer ")
        push_token = requests.get(
            tokens.realm, params={"service": tokens.service, "scope": f"repository:{repo}:pull,push"},
            auth=("bob", "pw"), timeout=5,
        ).json()["token"]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {push_token}"
        push_artifact(reg.url, repo, "v1", qcow2_image(b"one"), NAME, session=session)

        info = reg_manager(f"{reg.host}/{repo}").install()  # anonymous pull token
        assert info.version == "v1" and paths.image_path().read_bytes() == qcow2_image(b"one")
        assert any(i["user"] == "" and f"repository:{repo}:pull" in i["scope"] for i in tokens.issued)

        push_artifact(reg.url, repo, "v2", qcow2_image(b"two"), NAME, session=session)
        monkeypatch.setenv("CORE_REGISTRY_USER", "bob")
        monkeypatch.setenv("CORE_REGISTRY_PASSWORD", "pw")
        assert reg_manager(f"{reg.host}/{repo}").check_update() == ("v1", "v2", True)
        assert tokens.issued[-1]["user"] == "bob"
        monkeypatch.setenv("CORE_REGISTRY_PASSWORD", "nope")
        with pytest.raises(SourceError, match="refused access .*check CORE_REGISTRY_USER/CORE_REGISTRY_PASSWORD"):
            reg_manager(f"{reg.host}/{repo}").check_update()
    finally:
        reg.stop()
        tokens.stop()


@needs_registry
def test_registry_source_direct_download(registry, tmp_path):
    repo = "core/devops-f"
    data = qcow2_image(os.urandom(100_000))
    push_artifact(registry.url, repo, "v3.0.0", data, NAME)
    source = RegistrySource(SourceConfig(registry_image=f"{registry.host}/{repo}", image_name=NAME, quiet=True))
    assert source.available() and source.latest_version() == "v3.0.0"
    assert source.download(tmp_path / "out.qcow2") == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out.qcow2").read_bytes() == data


@needs_registry
def test_registry_refuses_a_qcow2_naming_a_host_file(registry, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host-only secret\n")
    push_artifact(registry.url, "core/crafted", "v1", crafted_qcow2(tmp_path, backing=secret), NAME)
    with pytest.raises(ImageError, match=f"^registry: {NAME} names a backing file '{secret}'"):
        reg_manager(f"{registry.host}/core/crafted").install()
    assert not paths.image_path().exists() and not paths.manifest_path().exists()


def test_registry_off_loopback_is_https_only(monkeypatch):
    monkeypatch.setenv("CORE_INSECURE_REGISTRIES", "reg.example:5000")  # no longer a way to plain http
    config = Config.from_dict({"images": {"registry": {"image": "reg.example:5000/core/devops"}}})
    source = RegistrySource(SourceConfig.from_config(config, image_name=NAME))
    assert source.base == "https://reg.example:5000/v2/core/devops"
    assert RegistrySource(SourceConfig(registry_image="127.0.0.1:5000/a/b")).base.startswith("http://127.0.0.1:5000/")
    assert RegistrySource(SourceConfig(registry_image="localhost:5000/a/b")).base.startswith("http://localhost:5000/")


@pytest.fixture
def fake_registry():
    """A loopback server answering as a registry would, for answers a real one never sends."""
    with FileServer() as srv:
        yield srv


@pytest.mark.parametrize("what", ["tag list", "manifest", "token"])
def test_registry_endless_answers_are_cut_off(fake_registry, what):
    image, path = f"127.0.0.1:{fake_registry.httpd.server_address[1]}/core/big", "/v2/core/big/tags/list"
    if what == "manifest":
        image, path = image + ":v1", "/v2/core/big/manifests/v1"
    if what == "token":
        challenge = {"WWW-Authenticate": f'Bearer realm="{fake_registry.url}/token",service="test"'}
        fake_registry.routes["/v2/core/big/tags/list"] = lambda h: FileServer._plain(h, 401, b"{}", challenge)
        path = "/token"
    fake_registry.oversized(path, 64 * MiB)
    with pytest.raises(SourceError, match=rf"{fake_registry.url}{path}: the answer is larger than 4 MiB; refusing to read it$"):
        reg_manager(image).install()
    assert fake_registry.sent_by[path] < CAP + 16 * MiB


def test_registry_token_realm_over_plain_http_off_loopback_is_refused(fake_registry):
    challenge = {"WWW-Authenticate": 'Bearer realm="http://192.0.2.10/token",service="test"'}
    fake_registry.routes["/v2/core/x/tags/list"] = lambda h: FileServer._plain(h, 401, b"{}", challenge)
    port = fake_registry.httpd.server_address[1]
    with pytest.raises(SourceError, match=r"token server: http://192.0.2.10/token: plain http is refused"):
        reg_manager(f"127.0.0.1:{port}/core/x").install()
