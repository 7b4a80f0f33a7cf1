import pytest

from devops_tasks import Config, config_path, default_config, load_config
from devops_tasks.errors import ConfigError


def write_config(text):
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults():
    cfg = default_config()
    assert cfg.version == 1
    assert cfg.images.source == "auto"
    assert cfg.images.github.repo == "host-uk/core-images"
    assert cfg.images.registry.image == "ghcr.io/host-uk/core-devops"
    assert cfg.images.cdn.url == ""


def test_missing_file_gives_defaults():
    assert not config_path().exists()
    assert load_config() == default_config()


def test_full_file():
    write_config(
        "version: 2\n"
        "images:\n"
        "  source: cdn\n"
        "  github: {repo: me/imgs}\n"
        "  registry: {image: reg.example/me/dev}\n"
        "  cdn: {url: 'https://cdn.example.com/images'}\n"
    )
    cfg = load_config()
    assert cfg.version == 2
    assert cfg.images.source == "cdn"
    assert cfg.images.github.repo == "me/imgs"
    assert cfg.images.registry.image == "reg.example/me/dev"
    assert cfg.images.cdn.url == "https://cdn.example.com/images"


def test_partial_file_keeps_other_defaults():
    write_config("images:\n  cdn:\n    url: https://cdn.example.com\n")
    cfg = load_config()
    assert cfg.images.cdn.url == "https://cdn.example.com"
    assert cfg.images.source == "auto"
    assert cfg.images.github.repo == "host-uk/core-images"
    assert cfg.version == 1


def test_other_tools_keys_are_ignored_and_never_rewritten():
    text = "build:\n  targets: [a, b]\nimages:\n  source: github\n  extra: 1\n"
    path = write_config(text)
    cfg = load_config()
    assert cfg.images.source == "github"
    assert not hasattr(cfg, "build")
    assert path.read_text() == text


def test_empty_file_gives_defaults():
    write_config("")
    assert load_config() == default_config()


def test_invalid_yaml_names_file_and_line():
    path = write_config("version: 1\nimages:\n  source: [auto\n")
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert str(path) in message
    assert "line " in message
    assert "\n" not in message


def test_top_level_not_a_mapping():
    path = write_config("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config()
    assert str(path) in str(pytest.raises(ConfigError, load_config).value)


def test_section_not_a_mapping_names_key():
    write_config("images: cdn\n")
    with pytest.raises(ConfigError, match="images"):
        load_config()


def test_unknown_source_lists_valid_ones():
    path = write_config("images:\n  source: ftp\n")
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert "'ftp'" in message and str(path) in message
    for name in ("auto", "github", "cdn", "registry", "build"):
        assert name in message


@pytest.mark.parametrize("source", ["auto", "github", "cdn", "registry", "build", "GitHub"])
def test_valid_sources(source):
    write_config(f"images:\n  source: {source}\n")
    assert load_config().images.source == source.lower()


def test_unreadable_file_is_an_error(tmp_path):
    path = config_path()
    path.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ConfigError, match="cannot read"):
        load_config()


def test_wrong_type_is_an_error():
    write_config("vm:\n  memory: lots\n")
    with pytest.raises(ConfigError, match="invalid value"):
        load_config()


def test_from_dict_round_trip():
    cfg = load_config()
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("text, message", [
    ("vm:\n  ssh_port: 0\n", r"vm.ssh_port: 0 is not a TCP port \(1 to 65535\)"),
    ("vm:\n  ssh_port: -5\n", r"vm.ssh_port: -5 is not a TCP port"),
    ("vm:\n  ssh_port: 65536\n", r"vm.ssh_port: 65536 is not a TCP port"),
    ("vm:\n  memory: 0\n", r"vm.memory: must be positive, not 0"),
    ("vm:\n  cpus: -1\n", r"vm.cpus: must be positive, not -1"),
])
def test_vm_values_a_vm_cannot_use_name_file_and_key(text, message):
    path = write_config(text)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_config()


@pytest.mark.parametrize("text, message", [
    ("vm:\n  network: closed\n", r"vm.network: unknown network mode 'closed' \(valid: open, restricted\)"),
    ("claude:\n  allow: [pypi.org, 'evil example']\n",
     r"claude.allow: allowlist entry 'evil example' is not host, \*.domain or host:port"),
    ("claude:\n  allow: ['*.com']\n", r"claude.allow: allowlist entry '\*.com' is not"),
    ("claude:\n  allow: ['host:70000']\n", r"claude.allow: allowlist entry 'host:70000' is not"),
    ("claude:\n  allow: {a: 1}\n", r"claude.allow: expected a list of host\[:port\] entries"),
    ("claude:\n  api_url: ftp://example.com\n", r"claude.api_url: 'ftp://example.com' is not an http"),
])
def test_network_values_name_file_and_key(text, message):
    path = write_config(text)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_config()


def test_network_defaults_and_values():
    cfg = default_config()
    assert cfg.vm.network == "open"
    assert "api.anthropic.com" in cfg.claude.allow and "*.github.com" in cfg.claude.allow
    assert cfg.claude.api_url == "https://api.anthropic.com"
    write_config("vm:\n  network: Restricted\nclaude:\n  allow: [pypi.org, '127.0.0.1:8080']\n")
    cfg = load_config()
    assert cfg.vm.network == "restricted" and cfg.claude.allow == ["pypi.org", "127.0.0.1:8080"]
    # an INVOKE_CORE_CLAUDE_ALLOW variable is one string
    assert Config.from_dict({"claude": {"allow": "a.example, b.example:8443"}}).claude.allow == \
        ["a.example", "b.example:8443"]


def test_the_default_claude_section_passes_the_checks_it_skips():
    """ClaudeConfig.check returns early for the defaults (so tasks other than claude skip the
    allowlist and upstream parsers): the defaults must be valid by those parsers."""
    from devops_tasks.config import DEFAULT_ALLOW, DEFAULTS
    from devops_tasks.proxy.allowlist import parse_entry
    from devops_tasks.proxy.upstream import Upstream

    for entry in DEFAULT_ALLOW:
        parse_entry(entry)
    Upstream.from_url(DEFAULTS["claude"]["api_url"])


def test_mount_idle_timeout_defaults_to_off_and_is_checked():
    assert default_config().vm.mount_idle_timeout == 0
    write_config("vm:\n  mount_idle_timeout: 300\n")
    assert load_config().vm.mount_idle_timeout == 300
    for bad in ("-1", "1e9", "soon"):
        write_config(f"vm:\n  mount_idle_timeout: {bad}\n")
        with pytest.raises(ConfigError, match="vm.mount_idle_timeout|invalid value"):
            load_config()
