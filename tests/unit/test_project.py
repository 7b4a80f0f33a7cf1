"""Project-folder rules (behaviour.md "Test" and "Serve"), ported from the Go suite and extended."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from devops_tasks import project
from devops_tasks.errors import ConfigError, ProjectError
from devops_tasks.project import (
    TestCommand,
    TestConfig,
    detect_serve_command,
    detect_test_command,
    load_test_config,
    resolve_serve_dir,
    resolve_test_command,
)

REFERENCE_YAML = """\
version: 1
command: go test ./...
commands:
  - name: unit
    run: go test -short ./...
  - name: integration
    run: go test -run Integration ./...
env:
  GOFLAGS: -v
"""

COMPOSER_TEST = '{"scripts": {"test": "pest"}}'
PACKAGE_TEST = '{"scripts": {"test": "vitest"}}'


def make(root: Path, files: dict[str, str | None]) -> Path:
    """Create files (None makes a directory) under root."""
    for name, content in files.items():
        target = root / name
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
    return root


def write_test_yaml(root: Path, text: str) -> Path:
    return make(root, {".core/test.yaml": text}) / ".core" / "test.yaml"


# --------------------------------------------------------------------------- detect_test_command

@pytest.mark.parametrize(
    "files, expected",
    [
        ({".core/test.yaml": "command: custom-test"}, "custom-test"),
        ({"composer.json": COMPOSER_TEST}, "composer test"),
        ({"composer.json": '{"scripts": {"test": ["@lint", "pest"]}}'}, "composer test"),
        ({"package.json": PACKAGE_TEST}, "npm test"),
        ({"go.mod": "module example"}, "go test ./..."),
        ({"pytest.ini": "[pytest]"}, "pytest"),
        ({"pyproject.toml": "[tool.pytest]"}, "pytest"),
        ({"Taskfile.yaml": "version: '3'"}, "task test"),
        ({"Taskfile.yml": "version: '3'"}, "task test"),
        ({}, ""),
    ],
    ids=["test-yaml", "composer", "composer-list", "package", "go", "pytest-ini", "pyproject",
         "taskfile-yaml", "taskfile-yml", "empty"],
)
def test_detect_test_each_branch(tmp_path, files, expected):
    assert detect_test_command(make(tmp_path, files)) == expected


@pytest.mark.parametrize(
    "files, expected",
    [
        # each rule beats the ones below it
        ({".core/test.yaml": "command: my-custom-test", "composer.json": COMPOSER_TEST,
          "go.mod": "module x"}, "my-custom-test"),
        ({"composer.json": COMPOSER_TEST, "package.json": PACKAGE_TEST}, "composer test"),
        ({"package.json": PACKAGE_TEST, "go.mod": "module x"}, "npm test"),
        ({"go.mod": "module x", "pyproject.toml": ""}, "go test ./..."),
        ({"pytest.ini": "", "Taskfile.yml": ""}, "pytest"),
        ({"pyproject.toml": "", "Taskfile.yaml": ""}, "pytest"),
        # things that do not match fall through to the next rule
        ({"composer.json": '{"name": "test/pkg"}', "package.json": PACKAGE_TEST}, "npm test"),
        ({"package.json": '{"scripts": {"build": "webpack"}}', "go.mod": "module x"}, "go test ./..."),
        ({"package.json": "invalid json", "go.mod": "module x"}, "go test ./..."),
        ({"composer.json": "{not json", "pytest.ini": ""}, "pytest"),
        ({"package.json": '["scripts"]', "go.mod": ""}, "go test ./..."),
        ({"package.json": '{"scripts": ["test"]}', "go.mod": ""}, "go test ./..."),
        ({"package.json": '{"scripts": {"test": null}}', "go.mod": ""}, "go test ./..."),
        ({"package.json": '{"scripts": {"test": 1}}', "go.mod": ""}, "go test ./..."),
        ({"composer.json": '{"scripts": null}', "go.mod": ""}, "go test ./..."),
        ({"go.mod/": None, "pyproject.toml": ""}, "pytest"),
        ({"package.json/": None, "Taskfile.yml": ""}, "task test"),
        ({"pytest.ini/": None, "pyproject.toml/": None, "Taskfile.yml/": None}, ""),
        ({".core/test.yaml": "version: 1", "go.mod": ""}, "go test ./..."),
        ({".core/test.yaml": "command: '   '", "go.mod": ""}, "go test ./..."),
        ({".core/test.yaml": "command: [unclosed", "go.mod": ""}, "go test ./..."),
        ({".core/test.yaml": "commands: nope", "pytest.ini": ""}, "pytest"),
        ({".core/test.yaml/": None, "pytest.ini": ""}, "pytest"),
        ({"composer.json": '{"name": "x"}'}, ""),
        ({"package.json": '{"name": "x"}'}, ""),
    ],
    ids=["yaml>composer", "composer>package", "package>go", "go>pyproject", "pytest-ini>taskfile",
         "pyproject>taskfile", "composer-no-test", "package-no-test", "package-invalid-json",
         "composer-invalid-json", "top-level-not-object", "scripts-not-object", "script-null",
         "script-not-string", "scripts-null", "dir-go-mod", "dir-package-json", "dirs-only",
         "yaml-no-command", "yaml-blank-command", "yaml-broken", "yaml-bad-shape", "yaml-is-dir",
         "composer-only-no-test", "package-only-no-test"],
)
def test_detect_test_precedence_and_fallthrough(tmp_path, files, expected):
    assert detect_test_command(make(tmp_path, files)) == expected


def test_detect_test_tolerates_non_utf8_and_bom(tmp_path):
    (tmp_path / "composer.json").write_bytes(b'{"scripts": {"test": "\xff"}}')
    (tmp_path / "package.json").write_bytes(b'\xef\xbb\xbf{"scripts": {"test": "jest"}}')
    assert detect_test_command(tmp_path) == "npm test"


def test_detect_test_unreadable_package_json_is_no_script(tmp_path, monkeypatch):
    make(tmp_path, {"package.json": PACKAGE_TEST, "go.mod": ""})
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name == "package.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert detect_test_command(tmp_path) == "go test ./..."


def test_detect_test_symlinked_file_counts(tmp_path):
    make(tmp_path, {"real/go.mod": "module x"})
    (tmp_path / "go.mod").symlink_to(tmp_path / "real" / "go.mod")
    assert detect_test_command(tmp_path) == "go test ./..."


# --------------------------------------------------------------------------- load_test_config

def test_load_reference_example(tmp_path):
    write_test_yaml(tmp_path, REFERENCE_YAML)
    assert load_test_config(tmp_path) == TestConfig(
        version=1,
        command="go test ./...",
        commands=[
            TestCommand("unit", "go test -short ./..."),
            TestCommand("integration", "go test -run Integration ./..."),
        ],
        env={"GOFLAGS": "-v"},
    )


@pytest.mark.parametrize("text", ["", "# only a comment\n", "~\n", "version: 1\n"])
def test_load_minimal_gives_defaults(tmp_path, text):
    write_test_yaml(tmp_path, text)
    assert load_test_config(tmp_path) == TestConfig()


def test_load_version_and_unknown_keys(tmp_path):
    write_test_yaml(tmp_path, "version: 2\nowner: someone-else\ncommand: make test\n")
    config = load_test_config(tmp_path)
    assert (config.version, config.command) == (2, "make test")


def test_load_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_test_config(tmp_path)
    message = str(info.value)
    assert str(tmp_path / ".core" / "test.yaml") in message
    assert "not found (create .core/test.yaml)" in message


def test_load_core_is_a_file_counts_as_missing(tmp_path):
    make(tmp_path, {".core": "not a dir"})
    with pytest.raises(ConfigError, match="not found"):
        load_test_config(tmp_path)


def test_load_test_yaml_directory(tmp_path):
    make(tmp_path, {".core/test.yaml/": None})
    with pytest.raises(ConfigError, match="is a directory"):
        load_test_config(tmp_path)


@pytest.mark.parametrize(
    "text, line",
    [
        ("invalid: yaml: :\n", 1),
        ("version: 1\ncommand: [unclosed\n", 3),
        ("version: 1\ncommands:\n  - name: a\n   run: b\n", 4),
        ("a: 1\n---\nb: 2\n", 2),
        ("version: 1\nenv: !custom {A: b}\n", 2),
    ],
    ids=["mapping-values", "unclosed-flow", "bad-indent", "two-documents", "unknown-tag"],
)
def test_load_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = write_test_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_test_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line {line},")


def test_load_non_utf8(tmp_path):
    path = make(tmp_path, {".core/": None}) / ".core" / "test.yaml"
    path.write_bytes(b"command: \xff\n")
    with pytest.raises(ConfigError, match=r"test\.yaml: not valid UTF-8"):
        load_test_config(tmp_path)


@pytest.mark.parametrize(
    "text, field, line",
    [
        ("- a\n- b\n", "top level", 1),
        ("version: one\n", "`version`", 1),
        ("version: 1.5\n", "`version`", 1),
        ("command: [a, b]\n", "`command`", 1),
        ("commands: go test\n", "`commands`", 1),
        ("commands: {name: a, run: b}\n", "`commands`", 1),
        ("commands:\n  - go test\n", "`commands[0]`", 2),
        ("commands:\n  - name: a\n    run: b\n  - run: c\n", "`commands[1]` has no `name`", 4),
        ("commands:\n  - name: a\n", "`commands[0]` has no `run`", 2),
        ("commands:\n  - name: a\n    run:\n", "`commands[0].run` has no value", 3),
        ("commands:\n  - name: ''\n    run: x\n", "`commands[0].name` is empty", 2),
        ("commands:\n  - name: a\n    run: [x]\n", "`commands[0].run` must be a string", 3),
        ("env: [A=1]\n", "`env` must be a mapping", 1),
        ("env: A=1\n", "`env` must be a mapping", 1),
        ("env:\n  A:\n", "`env.A` has no value", 2),
        ("env:\n  A: ~\n", "`env.A` has no value", 2),
        ("env:\n  A: {b: c}\n", "`env.A` must be a string", 2),
        ("env:\n  NOT VALID: x\n", "`env.NOT VALID` is not a valid variable name", 2),
        ("env:\n  A: 1\n  A: 2\n", "duplicate key 'A'", 3),
        ("command: a\ncommand: b\n", "duplicate key 'command'", 2),
        ("commands:\n  - name: a\n    run: b\n    run: c\n", "duplicate key 'run'", 4),
        ("env:\n  ~: x\n", "env: keys must be plain strings", 2),
    ],
)
def test_load_wrong_shapes_name_file_field_and_line(tmp_path, text, field, line):
    path = write_test_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_test_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: line {line}: ")
    assert field in message


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"true"', "true"),
        ("true", "true"),
        ("false", "false"),
        ("1", "1"),
        ("1.50", "1.50"),
        ("0x1F", "0x1F"),
        ("-v", "-v"),
        ('""', ""),
        ("'a b'", "a b"),
        ("2024-01-02", "2024-01-02"),
    ],
)
def test_load_env_values_keep_their_text(tmp_path, value, expected):
    write_test_yaml(tmp_path, f"env:\n  CI: {value}\n")
    env = load_test_config(tmp_path).env
    assert env == {"CI": expected}
    assert type(env["CI"]) is str


def test_load_env_merge_key(tmp_path):
    write_test_yaml(tmp_path, "base: &b {A: 1, B: 2}\nenv:\n  <<: *b\n  B: three\n")
    assert load_test_config(tmp_path).env == {"A": "1", "B": "three"}


def test_load_strips_block_scalar_commands(tmp_path):
    write_test_yaml(tmp_path, "command: |\n  go test ./...\ncommands:\n  - name: ' unit '\n    run: >\n    "
                              "  go test\n      -short\n")
    config = load_test_config(tmp_path)
    assert config.command == "go test ./..."
    assert config.commands == [TestCommand("unit", "go test -short")]


def test_find_first_match_or_none():
    config = TestConfig(commands=[TestCommand("a", "one"), TestCommand("b", "two"), TestCommand("a", "three")])
    assert config.find("a") == TestCommand("a", "one")
    assert config.find("b").run == "two"
    assert config.find("c") is None


def test_config_defaults_are_not_shared():
    first, second = TestConfig(), TestConfig()
    first.env["A"] = "1"
    first.commands.append(TestCommand("x", "y"))
    assert second.env == {} and second.commands == []


# --------------------------------------------------------------------------- resolve_test_command

def test_resolve_explicit_beats_named_and_detected(tmp_path):
    write_test_yaml(tmp_path, REFERENCE_YAML)
    assert resolve_test_command(tmp_path, name="unit", command=["make", "check"]) == (
        "make check", {"GOFLAGS": "-v"})


def test_resolve_named_beats_detected(tmp_path):
    write_test_yaml(tmp_path, REFERENCE_YAML)
    assert resolve_test_command(tmp_path, name="integration") == (
        "go test -run Integration ./...", {"GOFLAGS": "-v"})


def test_resolve_detected_from_test_yaml_command(tmp_path):
    write_test_yaml(tmp_path, REFERENCE_YAML)
    assert resolve_test_command(tmp_path) == ("go test ./...", {"GOFLAGS": "-v"})


def test_resolve_detected_without_test_yaml_has_empty_env(tmp_path):
    make(tmp_path, {"package.json": PACKAGE_TEST})
    assert resolve_test_command(tmp_path) == ("npm test", {})


def test_resolve_env_applies_to_detected_command(tmp_path):
    write_test_yaml(tmp_path, "env:\n  CI: true\n")
    make(tmp_path, {"go.mod": ""})
    assert resolve_test_command(tmp_path) == ("go test ./...", {"CI": "true"})


@pytest.mark.parametrize(
    "words, expected",
    [
        (["go", "test", "-run", "A|B", "./..."], "go test -run 'A|B' ./..."),
        (["echo", "it's here", "$HOME"], "echo 'it'\"'\"'s here' '$HOME'"),
        (("pytest", "-k", "not slow"), "pytest -k 'not slow'"),
        (["npm", "test", ""], "npm test ''"),
    ],
)
def test_resolve_explicit_words_reach_guest_intact(tmp_path, words, expected):
    command, env = resolve_test_command(tmp_path, command=words)
    assert command == expected
    assert shlex.split(command) == list(words)
    assert env == {}


def test_resolve_explicit_rejects_string_and_empty(tmp_path):
    with pytest.raises(TypeError):
        resolve_test_command(tmp_path, command="go test")
    with pytest.raises(ProjectError, match="empty"):
        resolve_test_command(tmp_path, command=[""])


def test_resolve_unknown_name_lists_known_names(tmp_path):
    write_test_yaml(tmp_path, REFERENCE_YAML)
    with pytest.raises(ProjectError) as info:
        resolve_test_command(tmp_path, name="e2e")
    message = str(info.value)
    assert message.startswith('test command "e2e" not found in .core/test.yaml')
    assert "unit, integration" in message


def test_resolve_unknown_name_when_none_defined(tmp_path):
    write_test_yaml(tmp_path, "command: make test\n")
    with pytest.raises(ProjectError, match=r'"e2e" not found in \.core/test\.yaml \(it defines no named'):
        resolve_test_command(tmp_path, name="e2e")


def test_resolve_named_without_test_yaml_is_config_error(tmp_path):
    make(tmp_path, {"go.mod": ""})
    with pytest.raises(ConfigError, match=r"test\.yaml: not found \(create \.core/test\.yaml\)"):
        resolve_test_command(tmp_path, name="unit")


def test_resolve_nothing_detected(tmp_path):
    with pytest.raises(ProjectError) as info:
        resolve_test_command(tmp_path)
    assert str(info.value) == "could not detect test command (create .core/test.yaml)"


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"name": "unit"}, {"command": ["make", "test"]}],
    ids=["detected", "named", "explicit"],
)
def test_resolve_broken_test_yaml_is_reported(tmp_path, kwargs):
    # its env would apply to every command, so running without it would be wrong
    path = write_test_yaml(tmp_path, "env: [\n")
    make(tmp_path, {"go.mod": ""})
    with pytest.raises(ConfigError, match=f"^{path}: invalid YAML at line 2"):
        resolve_test_command(tmp_path, **kwargs)


# --------------------------------------------------------------------------- detect_serve_command

@pytest.mark.parametrize(
    "files, expected",
    [
        ({"artisan": "#!/usr/bin/env php"}, "php artisan octane:start --host=0.0.0.0 --port=8000"),
        ({"package.json": '{"scripts": {"dev": "vite"}}'}, "npm run dev -- --host 0.0.0.0"),
        ({"package.json": '{"scripts": {"start": "node ."}}'}, "npm start"),
        ({"composer.json": "{}"}, "frankenphp php-server -l :8000"),
        ({"go.mod": "module x", "main.go": "package main"}, "go run ."),
        ({"manage.py": ""}, "python manage.py runserver 0.0.0.0:8000"),
        ({}, "python3 -m http.server 8000"),
        # precedence and fall-through
        ({"artisan": "", "package.json": '{"scripts": {"dev": "vite"}}'},
         "php artisan octane:start --host=0.0.0.0 --port=8000"),
        ({"package.json": '{"scripts": {"dev": "vite", "start": "node ."}}'}, "npm run dev -- --host 0.0.0.0"),
        ({"package.json": '{"scripts": {"build": "vite build"}}', "composer.json": "{}"},
         "frankenphp php-server -l :8000"),
        ({"package.json": "not json", "manage.py": ""}, "python manage.py runserver 0.0.0.0:8000"),
        ({"package.json": '{"scripts": {"dev": "vite"}}', "composer.json": "{}"}, "npm run dev -- --host 0.0.0.0"),
        ({"composer.json": "{}", "go.mod": "", "main.go": ""}, "frankenphp php-server -l :8000"),
        ({"composer.json": "not json either"}, "frankenphp php-server -l :8000"),
        ({"go.mod": "module x", "manage.py": ""}, "python manage.py runserver 0.0.0.0:8000"),
        ({"main.go": "package main"}, "python3 -m http.server 8000"),
        ({"go.mod": "", "main.go": "", "manage.py": ""}, "go run ."),
        ({"go.mod": "", "main.go/": None}, "python3 -m http.server 8000"),
        ({"artisan/": None, "manage.py/": None}, "python3 -m http.server 8000"),
    ],
    ids=["artisan", "npm-dev", "npm-start", "composer", "go", "django", "fallback",
         "artisan>package", "dev>start", "package-no-dev-start>composer", "package-invalid>django",
         "package>composer", "composer>go", "composer-invalid-still-php", "go-without-main>django",
         "main-without-go-mod", "go>django", "dir-main-go", "dirs-only"],
)
def test_detect_serve(tmp_path, files, expected):
    assert detect_serve_command(make(tmp_path, files)) == expected


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"artisan": ""}, "php artisan octane:start --host=0.0.0.0 --port=3000"),
        ({"composer.json": "{}"}, "frankenphp php-server -l :3000"),
        ({"manage.py": ""}, "python manage.py runserver 0.0.0.0:3000"),
        ({}, "python3 -m http.server 3000"),
        ({"package.json": '{"scripts": {"dev": "vite"}}'}, "npm run dev -- --host 0.0.0.0"),
    ],
)
def test_detect_serve_custom_port_everywhere(tmp_path, files, expected):
    command = detect_serve_command(make(tmp_path, files), port=3000)
    assert command == expected
    assert "8000" not in command


@pytest.mark.parametrize("port", [0, -1, 65536, True, "8000", 80.0])
def test_detect_serve_rejects_bad_port(tmp_path, port):
    with pytest.raises(ProjectError, match="invalid port"):
        detect_serve_command(tmp_path, port=port)


# --------------------------------------------------------------------------- resolve_serve_dir

@pytest.mark.parametrize(
    "path, expected",
    [
        ("", "/app"),
        (".", "/app"),
        ("./", "/app"),
        ("public", "/app/public"),
        ("public/", "/app/public"),
        ("./web//site", "/app/web/site"),
        ("web/site/../site", "/app/web/site"),
        ("web/..", "/app"),
        ("with space", "/app/with space"),
    ],
)
def test_resolve_serve_dir_ok(tmp_path, path, expected):
    make(tmp_path, {"public/": None, "web/site/": None, "with space/": None})
    assert resolve_serve_dir(tmp_path, path) == expected


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/etc", "must be relative"),
        ("..", "leaves the project"),
        ("../other", "leaves the project"),
        ("public/../../other", "leaves the project"),
        ("missing", "no such directory"),
        ("index.html", "no such directory"),
        ("bad\0name", "no such directory"),
        ("outside-link", "outside the project"),
    ],
)
def test_resolve_serve_dir_rejects(tmp_path, path, reason):
    project_dir = make(tmp_path / "proj", {"public/": None, "index.html": "<p>"})
    make(tmp_path, {"other/": None})
    (project_dir / "outside-link").symlink_to(tmp_path / "other")
    with pytest.raises(ProjectError) as info:
        resolve_serve_dir(project_dir, path)
    message = str(info.value)
    assert message.startswith(f"--path {project._go_quote(path)}: ")
    assert reason in message


def test_resolve_serve_dir_inside_symlink_ok(tmp_path):
    make(tmp_path, {"public/": None})
    (tmp_path / "www").symlink_to(tmp_path / "public")
    assert resolve_serve_dir(tmp_path, "www") == "/app/www"


def test_is_project(tmp_path):
    from devops_tasks.project import PROJECT_MARKERS, is_project

    home = tmp_path / "someone"
    home.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not is_project(plain, home=home)
    for marker in PROJECT_MARKERS:
        folder = tmp_path / f"p-{marker}"
        folder.mkdir()
        (folder / marker).mkdir() if marker in (".core", ".git") else (folder / marker).write_text("")
        assert is_project(folder, home=home), marker
    (home / ".git").mkdir()  # a dotfiles repository does not make the home folder a project
    assert not is_project(home, home=home)
    assert not is_project("/", home=home)
