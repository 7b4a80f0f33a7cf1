"""What a project folder asks for: its test command and env, its serve command, its serve dir.

Pure functions of the folder (no VM, no network), so ``test`` and ``serve`` can decide everything
before touching the guest, and the rules can be tested on a temporary directory.

Choices beyond the Go original:

* ``.core/test.yaml`` scalars keep the text written in the file, as Go's yaml.v3 does when it
  decodes into ``string``: ``1`` gives ``"1"``, ``true`` gives ``"true"``, ``1.50`` gives
  ``"1.50"``. A null ``env`` value (``KEY:`` or ``KEY: ~``) is an error rather than Go's silent
  ``""``: write ``KEY: ""`` for an empty value. Env names must be shell identifiers, because the
  runner exports them in the guest's shell.
* Unlike Go, duplicate keys, commands without ``name``/``run`` and wrong shapes are errors that name
  the file, the line and the field.
* An explicit test command is a list of argv words, quoted with :func:`shlex.join`, so every word
  reaches the guest intact (Go joined them with spaces and let the guest shell re-split them). For
  shell syntax, pass it explicitly: ``-- sh -c 'make lint && make test'``.
* ``.core/test.yaml``'s ``env`` applies to every test command (the original ignored it), so
  :func:`resolve_test_command` raises a broken file's :class:`ConfigError` whatever the source of
  the command; only :func:`detect_test_command` treats a broken file as "no command there".
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence, Union

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .config import yaml_error
from .errors import ConfigError, ProjectError
from .guest.mount import GUEST_APP_DIR

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_SERVE_PORT = 8000

_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class TestCommand:
    """One named entry of ``commands:`` in ``.core/test.yaml``."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    run: str


@dataclass
class TestConfig:
    """``.core/test.yaml``: a default ``command``, named ``commands`` and the ``env`` for both."""

    __test__ = False

    version: int = 1
    command: str = ""
    commands: list[TestCommand] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # commands run in /app before the test (and serve) command, skipped while nothing they depend
    # on changed: the files setup_inputs names (globs), else the usual manifests and lock files
    setup: list[str] = field(default_factory=list)
    setup_inputs: list[str] = field(default_factory=list)

    def find(self, name: str) -> TestCommand | None:
        """The first command called ``name`` (first wins, like the Go loop), or None."""
        for entry in self.commands:
            if entry.name == name:
                return entry
        return None


def project_root(project_dir: PathLike) -> Path:
    """The project folder as an absolute path; :class:`ProjectError` when it is not a folder."""
    path = Path(project_dir).expanduser()
    if not path.is_dir():
        raise ProjectError(f"project directory {path} does not exist")
    return path.resolve()


# What makes a folder a project for ``inv shell`` (which then mounts it at /app): version control,
# a tasks.py, this tool's .core/, or a file the test and serve detection reads.
PROJECT_MARKERS = (".core", ".git", "tasks.py", "pyproject.toml", "pytest.ini", "package.json", "composer.json",
                   "go.mod", "Taskfile.yaml", "Taskfile.yml", "manage.py", "artisan")


def is_project(folder: PathLike, home: PathLike | None = None) -> bool:
    """Does ``folder`` look like a project? Never the home folder or ``/`` (a dotfiles repository
    there would otherwise hand the whole home to the VM)."""
    path = Path(folder).absolute()
    home_dir = Path(home if home is not None else Path.home()).absolute()
    if path == home_dir or path == Path(path.anchor):
        return False
    return any(os.path.lexists(path / marker) for marker in PROJECT_MARKERS)


def test_yaml_path(project_dir: PathLike) -> Path:
    """``<project>/.core/test.yaml``, absolute so error messages point at the real file."""
    return Path(project_dir).absolute() / ".core" / "test.yaml"


test_yaml_path.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


# --------------------------------------------------------------------------- test.yaml loading


def load_test_config(project_dir: PathLike) -> TestConfig:
    """Read and check ``.core/test.yaml``; every problem is a ConfigError naming the file."""
    path = test_yaml_path(project_dir)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{path}: not found (create .core/test.yaml)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (bad byte at offset {exc.start})") from None
    root = _parse_yaml(path, text)
    return _config_from_node(path, root)


def _parse_yaml(path: Path, text: str) -> Node | None:
    """Compose the YAML into nodes (keeping scalar text and lines); construct it once so merge keys
    are flattened and bad tags are reported here, as YAML errors."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _reject_duplicate_keys(path, root, set())
            loader.construct_document(root)
        return root
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _reject_duplicate_keys(path: Path, node: Node, seen: set[int]) -> None:
    """yaml.v3 (and YAML itself) forbid a key twice in one mapping; PyYAML silently keeps the last.

    Runs before merge keys (``<<``) are flattened, so overriding a merged key stays allowed.
    """
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        keys: set[str] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in keys:
                    raise _shape_error(path, key_node, f"duplicate key {key_node.value!r}")
                keys.add(key_node.value)
            _reject_duplicate_keys(path, key_node, seen)
            _reject_duplicate_keys(path, value_node, seen)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _reject_duplicate_keys(path, item, seen)


def _shape_error(path: Path, node: Node, message: str) -> ConfigError:
    return ConfigError(f"{path}: line {node.start_mark.line + 1}: {message}")


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def _mapping(path: Path, node: MappingNode, what: str) -> list[tuple[str, Node, Node]]:
    """(key text, key node, value node), merged keys first, a later key replacing an earlier one
    (only a merged key can repeat: real duplicates were rejected while parsing)."""
    items: dict[str, tuple[str, Node, Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode) or _is_null(key_node):
            raise _shape_error(path, key_node, f"{what}: keys must be plain strings")
        items.pop(key_node.value, None)
        items[key_node.value] = (key_node.value, key_node, value_node)
    return list(items.values())


def _text(path: Path, node: Node, what: str, required: bool = False) -> str:
    """A scalar's text as written (Go's yaml.v3 does the same for ``string`` fields)."""
    if _is_null(node):
        if required:
            raise _shape_error(path, node, f"`{what}` has no value")
        return ""
    if not isinstance(node, ScalarNode):
        raise _shape_error(path, node, f"`{what}` must be a string, not a {_kind(node)}")
    return node.value


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "mapping"
    if isinstance(node, SequenceNode):
        return "list"
    return "scalar"


def _config_from_node(path: Path, root: Node | None) -> TestConfig:
    config = TestConfig()
    if root is None or _is_null(root):
        return config  # an empty file, like Go: every field keeps its default
    if not isinstance(root, MappingNode):
        raise _shape_error(
            path, root, f"the top level must be a mapping (version, command, commands, env, setup), not a {_kind(root)}"
        )
    for key, _key_node, value in _mapping(path, root, "top level"):
        if key == "version":
            config.version = _version(path, value)
        elif key == "command":
            config.command = _text(path, value, "command").strip()
        elif key == "commands":
            config.commands = _commands(path, value)
        elif key == "env":
            config.env = _env(path, value)
        elif key == "setup":
            config.setup = _words(path, value, "setup")
        elif key == "setup_inputs":
            config.setup_inputs = _words(path, value, "setup_inputs")
            for pattern, item in zip(config.setup_inputs, value.value if isinstance(value, SequenceNode) else [value]):
                pure = PurePosixPath(pattern)
                if pure.is_absolute() or ".." in pure.parts:
                    raise _shape_error(path, item, f"`setup_inputs`: {pattern!r} must be a path inside the project")
        # other keys are ignored, as the Go struct ignored them
    return config


def _words(path: Path, node: Node, what: str) -> list[str]:
    """A string or a list of strings (each one non-empty)."""
    if _is_null(node):
        return []
    items = node.value if isinstance(node, SequenceNode) else [node]
    if not isinstance(node, (SequenceNode, ScalarNode)):
        raise _shape_error(path, node, f"`{what}` must be a string or a list of strings, not a {_kind(node)}")
    result = []
    for index, item in enumerate(items):
        where = f"{what}[{index}]" if isinstance(node, SequenceNode) else what
        text = _text(path, item, where, required=True).strip()
        if not text:
            raise _shape_error(path, item, f"`{where}` is empty")
        result.append(text)
    return result


def _version(path: Path, node: Node) -> int:
    if _is_null(node):
        return 1
    if not (isinstance(node, ScalarNode) and node.tag == _INT_TAG):
        raise _shape_error(path, node, "`version` must be an integer")
    loader = yaml.SafeLoader("")
    try:
        return int(loader.construct_object(node))
    finally:
        loader.dispose()


def _commands(path: Path, node: Node) -> list[TestCommand]:
    if _is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        raise _shape_error(path, node, f"`commands` must be a list of {{name, run}}, not a {_kind(node)}")
    commands = []
    for index, item in enumerate(node.value):
        where = f"commands[{index}]"
        if not isinstance(item, MappingNode):
            raise _shape_error(path, item, f"`{where}` must be a mapping with `name` and `run`, not a {_kind(item)}")
        fields = {key: value for key, _k, value in _mapping(path, item, where)}
        for required in ("name", "run"):
            if required not in fields:
                raise _shape_error(path, item, f"`{where}` has no `{required}`")
        name = _text(path, fields["name"], f"{where}.name", required=True).strip()
        run = _text(path, fields["run"], f"{where}.run", required=True).strip()
        if not name:
            raise _shape_error(path, fields["name"], f"`{where}.name` is empty")
        if not run:
            raise _shape_error(path, fields["run"], f"`{where}.run` is empty")
        commands.append(TestCommand(name=name, run=run))
    return commands


def _env(path: Path, node: Node) -> dict[str, str]:
    if _is_null(node):
        return {}
    if not isinstance(node, MappingNode):
        raise _shape_error(path, node, f"`env` must be a mapping of NAME: value, not a {_kind(node)}")
    env = {}
    for key, key_node, value in _mapping(path, node, "env"):
        if not _ENV_NAME.match(key):
            raise _shape_error(path, key_node, f"`env.{key}` is not a valid variable name (letters, digits, _)")
        if _is_null(value):
            raise _shape_error(path, value, f'`env.{key}` has no value (write {key}: "" for an empty one)')
        env[key] = _text(path, value, f"env.{key}")
    return env


# --------------------------------------------------------------------------- file probes


def _is_file(path: Path) -> bool:
    """A regular file (or a link to one); a directory with the name does not count."""
    return os.path.isfile(path)


def _read_json_object(path: Path) -> dict | None:
    """The file's top-level JSON object, or None when absent, unreadable, invalid or not an object."""
    if not _is_file(path):
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return None
    return data if isinstance(data, dict) else None


def _has_script(path: Path, script: str, composer: bool = False) -> bool:
    """Whether ``scripts`` in this package.json (or composer.json) defines ``script``.

    npm scripts are strings; composer also allows a list of commands. A null entry is no script.
    """
    data = _read_json_object(path)
    scripts = data.get("scripts") if data is not None else None
    if not isinstance(scripts, dict):
        return False
    value = scripts.get(script)
    if composer:
        return isinstance(value, (str, list))
    return isinstance(value, str)


# --------------------------------------------------------------------------- test


def detect_test_command(project_dir: PathLike) -> str:
    """The test command the project's files imply, first match wins; "" when none does."""
    root = Path(project_dir)
    try:
        config = load_test_config(root)
    except ConfigError:
        config = None  # a broken test.yaml is "no command there"; resolve_test_command reports it
    if config is not None and config.command:
        return config.command
    if _has_script(root / "composer.json", "test", composer=True):
        return "composer test"
    if _has_script(root / "package.json", "test"):
        return "npm test"
    if _is_file(root / "go.mod"):
        return "go test ./..."
    if _is_file(root / "pytest.ini") or _is_file(root / "pyproject.toml"):
        return "pytest"
    if _is_file(root / "Taskfile.yaml") or _is_file(root / "Taskfile.yml"):
        return "task test"
    return ""


def test_config_or_none(project_dir: PathLike) -> TestConfig | None:
    """test.yaml when it exists (broken → ConfigError), None when there is none."""
    if not os.path.lexists(test_yaml_path(project_dir)):
        return None
    return load_test_config(project_dir)


test_config_or_none.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _go_quote(text: str) -> str:
    """Go's ``%q`` for the names users type: double quotes, escapes for quotes and controls."""
    return json.dumps(text, ensure_ascii=False)


def resolve_test_command(
    project_dir: PathLike, name: str = "", command: Sequence[str] = ()
) -> tuple[str, dict[str, str]]:
    """The shell command to run in ``/app`` and the env for it.

    Priority: explicit ``command`` words (shell-quoted) > ``name`` from test.yaml > detection.
    """
    if isinstance(command, (str, bytes)):
        raise TypeError("command is a list of argv words, not a string")
    words = list(command)
    if words and not words[0].strip():
        raise ProjectError("the test command after -- is empty")
    config = load_test_config(project_dir) if name and not words else test_config_or_none(project_dir)
    env = dict(config.env) if config is not None else {}
    if words:
        return shlex.join(words), env
    if name:
        assert config is not None
        entry = config.find(name)
        if entry is None:
            names = [c.name for c in config.commands]
            known = f"defined: {', '.join(names)}" if names else "it defines no named commands"
            raise ProjectError(f"test command {_go_quote(name)} not found in .core/test.yaml ({known})")
        return entry.run, env
    detected = detect_test_command(project_dir)
    if not detected:
        raise ProjectError("could not detect test command (create .core/test.yaml)")
    return detected, env


# --------------------------------------------------------------------------- serve


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProjectError(f"invalid port {port!r} (use 1-65535)")
    return port


def detect_serve_command(project_dir: PathLike, port: int = DEFAULT_SERVE_PORT) -> str:
    """The dev-server command for the folder, first match wins; the fallback always serves files.

    With port 8000 the strings are exactly the original's. The npm and ``go run`` commands take no
    port (as in the original): the caller must make the port reach them, e.g. via ``PORT``.
    """
    port = _check_port(port)
    root = Path(project_dir)
    if _is_file(root / "artisan"):
        return f"php artisan octane:start --host=0.0.0.0 --port={port}"
    package = root / "package.json"
    if _is_file(package):
        if _has_script(package, "dev"):
            return "npm run dev -- --host 0.0.0.0"
        if _has_script(package, "start"):
            return "npm start"
    if _is_file(root / "composer.json"):
        return f"frankenphp php-server -l :{port}"
    if _is_file(root / "go.mod") and _is_file(root / "main.go"):
        return "go run ."
    if _is_file(root / "manage.py"):
        return f"python manage.py runserver 0.0.0.0:{port}"
    return f"python3 -m http.server {port}"


def resolve_serve_dir(project_dir: PathLike, path: str = "") -> str:
    """The guest directory to serve from: ``/app`` or ``/app/<path>``.

    The whole project stays mounted at ``/app`` (the original mounted the subdirectory in its
    place), so ``path`` must be a directory inside the project, symlinks included.
    """
    if not path or path == ".":
        return GUEST_APP_DIR
    label = f"--path {_go_quote(path)}"
    if os.path.isabs(path):
        raise ProjectError(f"{label}: must be relative to the project directory")
    relative = os.path.normpath(path)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise ProjectError(f"{label}: leaves the project directory")
    root = Path(project_dir)
    target = root / relative
    try:
        is_dir = target.is_dir()
        inside = target.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError, RuntimeError):
        is_dir, inside = False, False
    if not is_dir:
        raise ProjectError(f"{label}: no such directory in the project ({target})")
    if not inside:
        raise ProjectError(f"{label}: leads outside the project directory")
    if relative == os.curdir:
        return GUEST_APP_DIR
    return GUEST_APP_DIR + "/" + Path(relative).as_posix()


# --------------------------------------------------------------------------- fallbacks


@dataclass(frozen=True)
class Fallback:
    """What runs instead of a detected command whose program the image may lack: ``command``
    when the guest has no ``program`` ("" = decided here, from the project's files), saying
    ``note``."""

    program: str
    command: str
    note: str


def _composer_requires(root: Path, package: str) -> bool:
    data = _read_json_object(root / "composer.json") or {}
    return any(isinstance(data.get(key), dict) and package in data[key] for key in ("require", "require-dev"))


def serve_fallback(project_dir: PathLike, command: str, port: int = DEFAULT_SERVE_PORT) -> Fallback | None:
    """FrankenPHP is in no image: PHP's own server serves a composer.json project; Laravel Octane
    runs only when the project requires it, else Laravel's own ``artisan serve``."""
    root = Path(project_dir)
    port = _check_port(port)
    if command == f"php artisan octane:start --host=0.0.0.0 --port={port}" and not _composer_requires(root, "laravel/octane"):
        return Fallback("", f"php artisan serve --host=0.0.0.0 --port={port}",
                        "composer.json does not require laravel/octane: serving with php artisan serve")
    if command == f"frankenphp php-server -l :{port}":
        return Fallback("frankenphp", f"php -S 0.0.0.0:{port}",
                        "FrankenPHP is not in this image: serving with PHP's built-in server (php -S)")
    return None


def test_fallback(project_dir: PathLike, command: str) -> Fallback | None:
    """``task test`` without ``task`` in the image: the Taskfile's ``test`` commands, run by the shell,
    when they are plain commands (no templates, no other tasks)."""
    if command != "task test":
        return None
    root = Path(project_dir)
    for name in ("Taskfile.yaml", "Taskfile.yml"):
        if _is_file(root / name):
            commands = _taskfile_commands(root / name, "test")
            if commands:
                return Fallback("task", " && ".join(commands),
                                f"task is not in this image: running the test task's cmds from {name} with sh")
            return None
    return None


test_fallback.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _taskfile_commands(path: Path, name: str) -> list[str]:
    """The task's ``cmds`` as shell commands, or [] when it needs Task itself to run."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    tasks = data.get("tasks") if isinstance(data, dict) else None
    task = tasks.get(name) if isinstance(tasks, dict) else None
    if isinstance(task, (str, list)):
        task = {"cmds": [task] if isinstance(task, str) else task}
    if not isinstance(task, dict) or set(task) - {"cmds", "desc", "summary", "silent"}:
        return []
    commands = []
    for item in task.get("cmds") or []:
        if isinstance(item, dict) and set(item) <= {"cmd", "silent"}:
            item = item.get("cmd")
        if not isinstance(item, str) or not item.strip() or "{{" in item:
            return []
        commands.append(item.strip())
    return commands
