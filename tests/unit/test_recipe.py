"""Recipe parsing and validation, and the builder's error paths that need no network or QEMU."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import re
import struct
from pathlib import Path

import pytest

from devops_tasks import paths
from devops_tasks.build import builder, load_recipe, recipe_names, recipe_path, rootfs, tools
from devops_tasks.build.apt import Package
from devops_tasks.build.disk import initramfs
from devops_tasks.build.kernel import KernelTree
from devops_tasks.build.npm import NpmPin
from devops_tasks.build.recipe import parse_recipe, parse_size
from devops_tasks.errors import ConfigError, ImageError
from devops_tasks.manifest import ImageInfo, Manifest

GOOD = """\
kernel: linux-image-cloud-amd64
packages: [busybox-static, dropbear-bin]
"""


NPM = """\
npm:
  - name: "@acme/tool-x"
    version: {version}
    files: {{claude: /usr/local/bin/claude}}
"""


def parse(text: str, tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return parse_recipe(text, path)


# -- the shipped recipe ---------------------------------------------------------------------------
def test_minimal_recipe_loads_by_name():
    recipe = load_recipe("minimal")
    assert recipe_path("minimal").name == "minimal.yaml"
    assert "minimal" in recipe_names()
    assert recipe.name == "minimal"
    assert recipe.kernel.package.startswith("linux-image-")
    assert "console=ttyS0" in recipe.kernel.cmdline.split()
    for wanted in ("busybox-static", "dropbear-bin", "sshfs", "fuse3", "python3", "python3-pytest", "git", "bash"):
        assert wanted in recipe.packages
    for module in ("fuse", "qemu_fw_cfg", "virtio_net", "virtio_blk"):
        assert module in recipe.modules
    assert recipe.services[-1] == "ssh"
    assert recipe.disk_size == 8 << 30


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(GOOD)
    recipe = load_recipe(str(path))
    assert recipe.name == "mine"
    assert recipe.services == ("acpid", "network", "ssh")


def test_unknown_recipe_name_lists_available():
    with pytest.raises(ConfigError, match=r"unknown image recipe 'nope' \(available: .*minimal"):
        recipe_path("nope")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(str(tmp_path / "gone.yaml"))


# -- strict validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,field", [
    (GOOD + "pakages: [x]\n", "pakages"),
    (GOOD + "apt:\n  suite: bookworm\n  mirorr: http://x\n", "apt.mirorr"),
    ("kernel:\n  package: linux-image-amd64\n  cmdlin: x\npackages: [a1]\n", "kernel.cmdlin"),
    (GOOD + "files:\n  - path: /etc/x\n    content: y\n    owner: root\n", "files[0].owner"),
])
def test_unknown_field_names_file_and_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as err:
        parse(text, tmp_path)
    message = str(err.value)
    assert str(tmp_path / "r.yaml") in message
    assert f"unknown field '{field}'" in message
    assert "\n" not in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml: invalid YAML at line [23], column \d+: "):
        parse("kernel: x\npackages: [a, b\nother: 1\n", tmp_path)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("packages: [a1]\n", "missing required field 'kernel'"),
    ("kernel: linux-image-amd64\n", "missing required field 'packages'"),
    ("kernel: linux-image-amd64\npackages: busybox\n", "field 'packages' has the wrong type"),
    ("kernel: linux-image-amd64\npackages: []\n", "at least one package"),
    ("kernel: linux-image-amd64\npackages: [Bad_Name]\n", "invalid package name 'Bad_Name'"),
    ("kernel: linux-image-amd64\npackages: [a1, a1]\n", "listed twice"),
    (GOOD + "modules: [fuse, 'bad module']\n", "invalid module name"),
    (GOOD + "services: [ssh, frobnicate]\n", "unknown service 'frobnicate'"),
    (GOOD + "disk_size: lots\n", "field 'disk_size' must be a size"),
    (GOOD + "disk_size: 1M\n", "at least 256M"),
    (GOOD + "shell: bash\n", "field 'shell' must be an absolute path"),
    (GOOD + "hostname: Not_Valid\n", "invalid host name"),
    (GOOD + "python_bytecode: maybe\n", "python_bytecode"),
    (GOOD + "apt:\n  architecture: arm64\n", "only amd64"),
    ("kernel:\n  package: linux-image-amd64\n  cmdline: quiet\npackages: [a1]\n", "console=ttyS0"),
    ("kernel:\n  package: linux-image-amd64\n  cmdline: console=ttyS0 root=/dev/sda\npackages: [a1]\n", "root="),
    (GOOD + "files:\n  - path: etc/x\n    content: y\n", "absolute file path"),
    (GOOD + "files:\n  - path: /etc/../x\n    content: y\n", "absolute file path"),
    (GOOD + "files:\n  - path: /etc/x\n", "exactly one of 'content' or 'source'"),
    (GOOD + "files:\n  - path: /etc/x\n    content: a\n    source: b\n", "exactly one of"),
    (GOOD + "files:\n  - path: /etc/x\n    source: missing.txt\n", "cannot read"),
    (GOOD + "files:\n  - path: /etc/x\n    content: y\n    mode: 99999\n", "octal mode"),
    (GOOD + "files:\n  - path: /etc/x\n    content: y\n    mode: 755\n", "leading 0"),
    (GOOD + "exclude: [usr/share/doc]\n", "absolute paths"),
    (GOOD + NPM.format(version="'^2.1.0'"), "npm[0].version': '^2.1.0' is not an exact version"),
    (GOOD + NPM.format(version="latest"), "'latest' is not an exact version"),
    (GOOD + NPM.format(version="'2.x'"), "'2.x' is not an exact version"),
    (GOOD + NPM.format(version="'>=2.1.0'"), "is not an exact version"),
    (GOOD + NPM.format(version="2.1"), "write the exact version as a string"),
    (GOOD + NPM.format(version="'2.1.333'").replace("tool-x", "Tool X"), "invalid npm package name"),
    (GOOD + NPM.format(version="'1.0.0'").replace("{claude: /usr/local/bin/claude}", "{}"), "at least one path"),
    (GOOD + NPM.format(version="'1.0.0'").replace("claude: /usr", "../claude: /usr"), "a path inside the package"),
    (GOOD + NPM.format(version="'1.0.0'").replace("/usr/local/bin/claude", "usr/bin/claude"), "absolute file path"),
    (GOOD + NPM.format(version="'1.0.0'") + "    integrity: sha1-abc=\n", "sha512 integrity"),
    (GOOD + NPM.format(version="'1.0.0'") + "    tag: latest\n", "unknown field 'npm[0].tag'"),
    (GOOD + NPM.format(version="'1.0.0'") + NPM.format(version="'1.0.1'")[5:], "listed twice"),
    (GOOD + "npm_registry: registry.example\n", "field 'npm_registry' must be an http(s) URL"),
    (GOOD + "extends: nope-no-such-recipe\n", "field 'extends': unknown image recipe 'nope-no-such-recipe'"),
    (GOOD + "extends: [minimal]\n", "field 'extends' must be a string"),
    (GOOD + "extends: ''\n", "field 'extends' must name a recipe"),
])
def test_bad_recipes_are_one_line_config_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        parse(text, tmp_path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
    assert "r.yaml" in str(err.value)


def test_files_modes_sources_and_custom_services(tmp_path):
    (tmp_path / "hello.sh").write_text("#!/bin/sh\necho hi\n")
    recipe = parse(GOOD + """\
files:
  - path: /usr/local/bin/hello
    source: hello.sh
    mode: 0755
  - path: /etc/motd
    content: hi
  - path: /etc/private
    content: secret
    mode: 0600
  - path: /usr/lib/devops-tasks/services/web
    content: "#!/bin/sh\\n"
    mode: "0755"
services: [network, ssh, web]
""", tmp_path)
    by_path = {f.path: f for f in recipe.files}
    assert by_path["/usr/local/bin/hello"].data == b"#!/bin/sh\necho hi\n"
    assert by_path["/usr/local/bin/hello"].mode == 0o755
    assert by_path["/etc/motd"].mode == 0o644
    assert by_path["/etc/private"].mode == 0o600
    assert recipe.services == ("network", "ssh", "web")


@pytest.mark.parametrize("text,value", [("8G", 8 << 30), ("512M", 512 << 20), ("2GiB", 2 << 30), (4096, 4096),
                                        ("1T", 1 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_npm_packages_parse(tmp_path):
    recipe = parse(GOOD + NPM.format(version="'2.1.333-beta.1'").replace(
        "{claude: /usr/local/bin/claude}", "{claude: /usr/local/bin/claude, .: /opt/tool-x}")
        + "    integrity: sha512-" + "A" * 86 + "==\n", tmp_path)
    (package,) = recipe.npm
    assert (package.name, package.version, package.spec) == ("@acme/tool-x", "2.1.333-beta.1", "@acme/tool-x@2.1.333-beta.1")
    assert package.files == (("claude", "/usr/local/bin/claude"), (".", "/opt/tool-x"))
    assert package.integrity.startswith("sha512-AAA")
    assert recipe.npm_registry == ""


# -- extends ----------------------------------------------------------------------------------------
BASE = """\
kernel:
  package: linux-image-cloud-amd64
  cmdline: console=ttyS0 quiet
packages: [busybox-static, dropbear-bin]
modules: [fuse]
files:
  - {path: /etc/motd, content: base}
  - {path: /etc/issue, content: base}
shell: /bin/bash
hostname: base
"""


def test_extends_adds_to_lists_and_replaces_the_rest(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    child = parse("extends: base\npackages: [git, dropbear-bin]\nmodules: [virtio_net]\nhostname: child\n"
                  "files:\n  - {path: /etc/motd, content: child}\n" + NPM.format(version="'1.0.0'"), tmp_path)
    assert child.name == "r"
    assert child.packages == ("busybox-static", "dropbear-bin", "git")
    assert child.modules == ("fuse", "virtio_net")
    assert [(f.path, f.data) for f in child.files] == [("/etc/motd", b"child"), ("/etc/issue", b"base")]
    assert (child.hostname, child.shell, child.kernel.cmdline) == ("child", "/bin/bash", "console=ttyS0 quiet")
    assert [p.name for p in child.npm] == ["@acme/tool-x"]
    kernel_only = parse("extends: ./base.yaml\nkernel: {cmdline: console=ttyS0}\n", tmp_path)
    assert (kernel_only.kernel.package, kernel_only.kernel.cmdline) == ("linux-image-cloud-amd64", "console=ttyS0")


def test_extends_loops_and_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: field 'extends': recipes extend each other in a loop "
                                          r"\(a\.yaml -> b\.yaml -> a\.yaml\)"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text(BASE + "pakages: []\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown field 'pakages'"):
        parse("extends: bad\n", tmp_path)


def test_claude_recipe_is_minimal_plus_claude_code():
    minimal, claude = load_recipe("minimal"), load_recipe("claude")
    assert claude.name == "claude" and "claude" in recipe_names()
    assert claude.packages == minimal.packages and claude.kernel == minimal.kernel
    assert claude.modules == minimal.modules and claude.services == minimal.services
    (package,) = claude.npm
    assert package.name == "@anthropic-ai/claude-code-linux-x64"
    assert re.fullmatch(r"2\.1\.\d+", package.version)
    assert package.integrity.startswith("sha512-")
    assert ("claude", "/usr/local/bin/claude") in package.files


def test_identity_changes_with_what_shapes_the_image(tmp_path):
    a = parse(GOOD, tmp_path)
    b = parse(GOOD.replace("dropbear-bin]", "dropbear-bin, git]"), tmp_path)
    c = parse(GOOD + "hostname: other\n", tmp_path)
    assert a.identity() == parse(GOOD, tmp_path).identity()
    assert len({json.dumps(x.identity(), sort_keys=True) for x in (a, b, c)}) == 3


# -- version and building blocks ------------------------------------------------------------------
def test_version_hash_covers_exact_package_versions(tmp_path):
    recipe = parse(GOOD, tmp_path)
    kernel = Package("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1", "amd64")
    one = builder._version_hash(recipe, [Package("busybox-static", "1:1.35-1", "amd64")], kernel)
    two = builder._version_hash(recipe, [Package("busybox-static", "1:1.35-2", "amd64")], kernel)
    assert one != two
    assert one == builder._version_hash(recipe, [Package("busybox-static", "1:1.35-1", "amd64")], kernel)
    assert Package("a", "1:2.0-1", "amd64").filename == "a_1%3a2.0-1_amd64.deb"
    pin = NpmPin("@a/b", "1.0.0", "sha512-" + "A" * 86 + "==", "http://x/b.tgz")
    other = NpmPin("@a/b", "1.0.0", "sha512-" + "B" * 86 + "==", "http://x/b.tgz")
    assert builder._version_hash(recipe, [], kernel, [pin]) != builder._version_hash(recipe, [], kernel, [other])
    assert builder._version_hash(recipe, [], kernel, [pin]) != builder._version_hash(recipe, [], kernel)


def test_every_image_has_the_agent_user(tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/bash").write_text("")
    rootfs.guest_files(root, parse(GOOD + "shell: /bin/bash\n", tmp_path))
    assert "dev:x:1000:1000:dev:/home/dev:/bin/bash\n" in (root / "etc/passwd").read_text()
    assert "dev:!:" in (root / "etc/shadow").read_text()  # no password
    assert (root / "etc/group").read_text().endswith("\nnogroup:x:65534:\ndev:x:1000:\n")
    assert oct((root / "home/dev").stat().st_mode & 0o7777) == "0o700"
    assert rootfs.OWNERS == {"/home/dev": (1000, 1000)}


def _fake_module(path: Path, depends: str) -> None:
    """A minimal ELF64 file with a .modinfo section (what the kernel module reader needs)."""
    modinfo = f"license=GPL\0depends={depends}\0name={path.stem}\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    sh_off = shstr_off + len(shstr)
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0,
                                                              0, 64, 3, 2)
    sections = b"\0" * 64
    sections += struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + modinfo + shstr + sections)


def test_module_load_order_and_unknown_module(tmp_path):
    mods = tmp_path / "lib/modules/6.1.0-test"
    _fake_module(mods / "kernel/a/virtio.ko", "")
    _fake_module(mods / "kernel/a/virtio_ring.ko", "virtio")
    _fake_module(mods / "kernel/b/virtio-rng.ko", "virtio_ring,virtio,rng-core")
    (mods / "modules.builtin").write_text("kernel/drivers/char/hw_random/rng-core.ko\n")
    tree = KernelTree(tmp_path)
    order = [p.name for p in tree.load_order(("virtio_rng", "virtio"))]
    assert order == ["virtio.ko", "virtio_ring.ko", "virtio-rng.ko"]
    with pytest.raises(ImageError, match="unknown kernel module 'nope' in kernel 6.1.0-test"):
        tree.load_order(("nope",))


def test_initramfs_is_deterministic_newc(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake")
    module = tmp_path / "fuse.ko"
    module.write_bytes(b"module")
    one = initramfs(busybox, [module], 1700000000)
    assert one == initramfs(busybox, [module], 1700000000)
    blob = gzip.decompress(one)
    assert blob.startswith(b"070701")
    for name in (b"init\0", b"bin/busybox\0", b"dev/console\0", b"lib/modules/initramfs/fuse.ko\0",
                 b"lib/modules/initramfs/modules.dep\0", b"TRAILER!!!\0"):
        assert name in blob
    assert b"fuse.ko:\n" in blob and b"fuse\n" in blob


# -- bad host / disk: one-line errors, installed image and manifest untouched ---------------------
@pytest.fixture
def installed(tmp_path, monkeypatch):
    """An installed image + manifest in a tmp images dir; returns a checker that nothing changed."""
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("CORE_CACHE_DIR", str(tmp_path / "cache"))
    paths.images_dir().mkdir(parents=True)
    paths.image_path().write_bytes(b"old image")
    manifest = Manifest.load()
    manifest.set(paths.image_name(), ImageInfo(version="v1", source="github", sha256="0" * 64))
    manifest.save()
    before = (paths.image_path().read_bytes(), paths.manifest_path().read_bytes())

    def unchanged() -> bool:
        leftovers = [p.name for p in paths.images_dir().iterdir() if p.name.endswith(".tmp")]
        return (paths.image_path().read_bytes(), paths.manifest_path().read_bytes()) == before and not leftovers

    return unchanged


def test_missing_host_tools_name_the_apt_packages(installed, monkeypatch):
    real = tools.which
    monkeypatch.setattr(tools, "which", lambda name: None if name in ("mkfs.vfat", "qemu-img") else real(name))
    with pytest.raises(ImageError) as err:
        builder.build(load_recipe("minimal"))
    message = str(err.value)
    assert "mkfs.vfat" in message and "qemu-img" in message
    assert "apt-get install dosfstools qemu-utils" in message
    assert installed()


def _fake_plan(recipe):
    kernel = Package("linux-image-x", "1", "amd64")
    return builder.Plan(recipe, [Package("busybox-static", "1", "amd64")], kernel, "minimal-0123456789abcdef", None)


def test_full_disk_before_building_is_a_clear_error(installed, monkeypatch):
    monkeypatch.setattr(tools, "missing_tools", lambda: [])
    monkeypatch.setattr(builder, "require_tools", lambda: None)
    monkeypatch.setattr(builder, "plan", lambda recipe, refresh=None, log=None: _fake_plan(recipe))
    monkeypatch.setattr(builder.shutil, "disk_usage", lambda path: type("U", (), {"free": 10 << 20})())
    with pytest.raises(ImageError, match=r"not enough free disk space in .* 10 MB free"):
        builder.build(load_recipe("minimal"))
    assert installed()


def test_disk_full_while_installing_keeps_the_old_image(installed, monkeypatch, tmp_path):
    monkeypatch.setattr(builder, "require_tools", lambda: None)
    monkeypatch.setattr(builder, "plan", lambda recipe, refresh=None, log=None: _fake_plan(recipe))
    finished = tmp_path / "finished.qcow2"
    finished.write_bytes(b"new image")
    digest = hashlib.sha256(b"new image").hexdigest()
    monkeypatch.setattr(builder, "produce", lambda plan, log, force=False: (finished, digest, True))

    def no_space(src, dst, length=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builder.shutil, "copyfileobj", no_space)
    with pytest.raises(ImageError) as err:
        builder.build(load_recipe("minimal"))
    assert "no space left on the disk" in str(err.value)
    assert installed()


def test_invalid_manifest_fails_before_anything_changes(installed, monkeypatch):
    paths.manifest_path().write_text("{not json")
    called = []
    monkeypatch.setattr(builder, "require_tools", lambda: None)
    monkeypatch.setattr(builder, "plan", lambda *a, **k: called.append(1))
    with pytest.raises(Exception, match="manifest"):
        builder.build(load_recipe("minimal"))
    assert called == []
    assert paths.image_path().read_bytes() == b"old image"


def test_successful_install_replaces_image_then_manifest(installed, monkeypatch, tmp_path):
    monkeypatch.setattr(builder, "require_tools", lambda: None)
    monkeypatch.setattr(builder, "plan", lambda recipe, refresh=None, log=None: _fake_plan(recipe))
    finished = tmp_path / "finished.qcow2"
    finished.write_bytes(b"new image")
    digest = hashlib.sha256(b"new image").hexdigest()
    monkeypatch.setattr(builder, "produce", lambda plan, log, force=False: (finished, digest, True))
    result = builder.build(load_recipe("minimal"))
    assert paths.image_path().read_bytes() == b"new image"
    info = Manifest.load().get(paths.image_name())
    assert (info.version, info.source, info.sha256, info.guest_contract) == (result.version, "build", digest, 1)

    out = tmp_path / "elsewhere.qcow2"
    manifest_before = paths.manifest_path().read_bytes()
    builder.build(load_recipe("minimal"), output=out)
    assert out.read_bytes() == b"new image"
    assert paths.manifest_path().read_bytes() == manifest_before


def test_run_reports_program_and_last_error_line(tmp_path):
    with pytest.raises(ImageError, match=r"^listing: ls failed: .*nonexistent"):
        tools.run(["ls", str(tmp_path / "nonexistent")], "listing")
    with pytest.raises(ImageError, match="program 'no-such-tool-xyz' not found"):
        tools.run(["no-such-tool-xyz"], "doing it")
