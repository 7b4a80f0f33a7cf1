"""How a project's dependencies are installed in the guest before its tests or server run, once.

Pure functions of the project folder (no VM), like :mod:`.project`: they decide the steps, the
guest runs them (:mod:`.workspace`). A step is ``.core/test.yaml``'s ``setup:`` when it has one;
else each ecosystem's obvious install when it is needed:

* ``npm ci`` with a package-lock.json (or npm-shrinkwrap.json) and no node_modules; with no lock
  file but dependencies declared, ``npm install --no-package-lock`` (the project gets no lock file
  it did not have);
* ``composer install`` with a composer.lock and no vendor/;
* a virtual environment for a Python project that declares dependencies, test extras
  (``test``/``tests``/``testing``), such dependency groups or requirements files: it lives on the
  VM's disk (not in the project) and its ``bin`` comes first on the command's PATH.

A step's key is a hash of its commands and of the files it depends on (manifests and lock files).
The guest keeps the key of each step that ran to the end, with the output folders (node_modules,
vendor) there then; a step runs again when its key changed or when what it made is missing. A
detected step never replaces a node_modules or vendor/ it did not make.
"""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .project import TestConfig

STATE_DIR = "/var/lib/devops-tasks/projects"  # on the VM's disk: survives stop/boot, not --fresh
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TEST_EXTRAS = ("test", "tests", "testing")
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt", "requirements_dev.txt", "requirements-test.txt",
                "requirements_test.txt", "test-requirements.txt", "dev-requirements.txt")
# what an explicit setup is keyed on when test.yaml names no setup_inputs
DEFAULT_INPUTS = ("package.json", "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml",
                  "composer.json", "composer.lock", "go.mod", "go.sum", "pyproject.toml", "setup.cfg", "setup.py",
                  "Pipfile", "Pipfile.lock", "poetry.lock", "uv.lock", *REQUIREMENTS)
PIP_WITH_GROUPS = "pip>=25.1"  # the first pip with --group (PEP 735 dependency groups)
# project folders installs make: a step's kept key lists those there when it finished, and the step
# runs again when one of them is gone (deleted on the host, say)
OUTPUT_DIRS = ("node_modules", "vendor")


@dataclass(frozen=True)
class Step:
    """One install: ``commands`` run in /app in order; ``name`` names its key in the guest."""

    name: str
    commands: tuple[str, ...]
    summary: str  # what it does, for the user
    inputs: tuple[str, ...] = ()  # project files (relative) whose contents key it
    creates: str = ""  # the project folder it makes (node_modules, vendor); "" = none
    venv: bool = False  # makes the project's virtual environment (guest side)
    tool: str = ""  # the guest program it needs ("" = none to check)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    state_dir: str = ""  # this project's folder in the guest
    keys: dict[str, str] = field(default_factory=dict)  # step name -> key

    @property
    def venv(self) -> str:
        return f"{self.state_dir}/venv" if any(step.venv for step in self.steps) else ""

    def env(self) -> dict[str, str]:
        """What the command runs with: the venv's ``bin`` first on PATH, when there is one."""
        if not self.venv:
            return {}
        return {"VIRTUAL_ENV": self.venv, "PATH": f"{self.venv}/bin:{GUEST_PATH}"}


def project_id(root: Path) -> str:
    """The project's name in the guest's state folder: its host path, hashed."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


def state_dir(root: Path) -> str:
    return f"{STATE_DIR}/{project_id(root)}"


def step_key(root: Path, step: Step) -> str:
    """A hash of the step's commands and of its input files' names and contents (absent ones too)."""
    digest = hashlib.sha256(json.dumps(list(step.commands)).encode())
    for rel in step.inputs:
        digest.update(b"\0" + rel.encode() + b"\0")
        try:
            digest.update(hashlib.sha256((root / rel).read_bytes()).digest())
        except OSError:
            digest.update(b"-")
    return digest.hexdigest()


def _expand(root: Path, patterns: Iterable[str]) -> tuple[str, ...]:
    """Project files matching the patterns (relative globs), sorted, no duplicates."""
    found: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
        else:
            matches = [pattern] if (root / pattern).is_file() else []
        found += [m for m in matches if m not in found]
    return tuple(found)


def plan(project_dir: Path, config: TestConfig | None = None, command: str = "") -> Plan:
    """The steps for this project: test.yaml's ``setup`` when given, else the detected ones."""
    root = Path(project_dir)
    if config is not None and config.setup:
        inputs = _expand(root, config.setup_inputs or DEFAULT_INPUTS)
        steps: tuple[Step, ...] = (Step("setup", tuple(config.setup), "; ".join(config.setup), inputs),)
    else:
        steps = tuple(step for step in (_npm(root), _composer(root), _python(root, command)) if step is not None)
    if not steps:
        return Plan()
    return Plan(steps, state_dir(root), {step.name: step_key(root, step) for step in steps})


# -- detection --------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _npm(root: Path) -> Step | None:
    package = root / "package.json"
    if not package.is_file():
        return None
    for lock in ("package-lock.json", "npm-shrinkwrap.json"):
        if (root / lock).is_file():
            return Step("npm", ("npm ci",), "npm ci", ("package.json", lock), creates="node_modules", tool="npm")
    data = _json(package)
    if not any(isinstance(data.get(k), dict) and data[k] for k in ("dependencies", "devDependencies")):
        return None
    return Step("npm", ("npm install --no-package-lock",), "npm install --no-package-lock", ("package.json",),
                creates="node_modules", tool="npm")


def _composer(root: Path) -> Step | None:
    if not (root / "composer.json").is_file() or not (root / "composer.lock").is_file():
        return None
    return Step("composer", ("composer install --no-interaction",), "composer install",
                ("composer.json", "composer.lock"), creates="vendor", tool="composer")


def _toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def python_requirements(root: Path) -> tuple[list[str], list[str], bool, list[str]]:
    """What a Python project declares: (its test extras, its test dependency groups, whether it
    is an installable project with dependencies or extras, its requirements files)."""
    extras: list[str] = []
    groups: list[str] = []
    installable = False
    data = _toml(root / "pyproject.toml") if (root / "pyproject.toml").is_file() else {}
    project = data.get("project") if isinstance(data.get("project"), dict) else {}
    optional = project.get("optional-dependencies") if isinstance(project.get("optional-dependencies"), dict) else {}
    extras += [name for name in TEST_EXTRAS if name in optional]
    declared = data.get("dependency-groups") if isinstance(data.get("dependency-groups"), dict) else {}
    groups += [name for name in TEST_EXTRAS if name in declared]
    if project and (project.get("dependencies") or optional):
        installable = True
    cfg = root / "setup.cfg"
    if cfg.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(cfg, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            pass
        else:
            if parser.has_section("options.extras_require"):
                extras += [name for name in TEST_EXTRAS if parser.has_option("options.extras_require", name)
                           and name not in extras]
            if parser.has_section("options") and (parser.get("options", "install_requires", fallback="").strip()
                                                   or parser.has_section("options.extras_require")):
                installable = True
    if extras:
        installable = True
    requirements = [name for name in REQUIREMENTS if (root / name).is_file()]
    return extras, groups, installable, requirements


def _python(root: Path, command: str) -> Step | None:
    extras, groups, installable, requirements = python_requirements(root)
    if not (installable or groups or requirements):
        return None
    venv = f"{state_dir(root)}/venv"
    pip = f"{venv}/bin/python -m pip install -q"
    commands = [f"python3 -m venv {venv}"]
    installs = []
    if groups:
        installs.append(shlex.quote(PIP_WITH_GROUPS))
    if installable or groups:
        target = "." + (f"[{','.join(extras)}]" if extras else "")
        words = ["-e", target] + [f"--group={group}" for group in groups]
        if command_uses_pytest(command):
            words.append("pytest")
        installs.append(shlex.join(words))
    installs += [f"-r {shlex.quote(name)}" for name in requirements]
    if requirements and not (installable or groups) and command_uses_pytest(command):
        installs.append("pytest")
    commands += [f"{pip} {args}" for args in installs]
    inputs = tuple(name for name in ("pyproject.toml", "setup.cfg", "setup.py") if (root / name).is_file())
    summary = "a virtual environment, pip install " + "; pip install ".join(installs)
    return Step("python", tuple(commands), summary, inputs + tuple(requirements), venv=True, tool="python3-venv")


def command_uses_pytest(command: str) -> bool:
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    return bool(words) and (fnmatch.fnmatch(os.path.basename(words[0]), "pytest*")
                            or words[:3] in (["python3", "-m", "pytest"], ["python", "-m", "pytest"]))


# -- the guest side ---------------------------------------------------------------------------------

def probe_script(plan: Plan, programs: Iterable[str] = ()) -> str:
    """One guest command (shell builtins only) that prints what the decisions need: ``have NAME``
    for each program found, ``have python3-venv``, ``have venv`` (the project's), ``key STEP KEY
    [DIR...]`` for each key the guest kept (with the output folders there when it was kept)."""
    wanted = sorted({step.tool for step in plan.steps if step.tool and step.tool != "python3-venv"} | set(programs))
    lines = []
    if wanted:
        lines.append(f"for p in {' '.join(shlex.quote(p) for p in wanted)}; do "
                     "command -v \"$p\" >/dev/null 2>&1 && echo \"have $p\"; done")
    if any(step.venv for step in plan.steps):
        lines.append("for d in /usr/lib/python3*/ensurepip; do [ -d \"$d\" ] && echo 'have python3-venv'; break; done")
        lines.append(f"[ -x {shlex.quote(plan.venv)}/bin/python ] && echo 'have venv'")
    if plan.steps:
        lines.append(f"for k in {shlex.quote(plan.state_dir)}/*.key; do [ -f \"$k\" ] || continue; "
                     "read -r v < \"$k\"; n=${k##*/}; echo \"key ${n%.key} $v\"; done")
    lines.append("true")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Facts:
    """What the probe found in the guest."""

    have: frozenset[str] = frozenset()
    keys: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # step -> folders when kept

    @classmethod
    def parse(cls, text: str) -> "Facts":
        have, keys, outputs = set(), {}, {}
        for line in text.splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "have":
                have.add(words[1])
            elif len(words) >= 3 and words[0] == "key":
                keys[words[1]] = words[2]
                outputs[words[1]] = tuple(words[3:])
        return cls(frozenset(have), keys, outputs)


@dataclass(frozen=True)
class Decision:
    step: Step
    run: bool
    message: str  # what to tell the user ("" = nothing)


def decide(root: Path, plan: Plan, facts: Facts, force: bool = False) -> list[Decision]:
    """Whether each step runs now, and what to say about it. A step runs when forced, when what it
    makes is missing (node_modules, vendor/, the venv, or an output folder it left), or when its key
    differs from the one the guest kept (no kept key: it never ran to the end). A detected step
    whose node_modules or vendor/ is there without a kept key leaves them alone: they are the
    user's."""
    out = []
    for step in plan.steps:
        key = plan.keys[step.name]
        kept = facts.keys.get(step.name)
        gone = [d for d in facts.outputs.get(step.name, ()) if not (Path(root) / d).exists()] if kept == key else []
        if step.creates and not (Path(root) / step.creates).exists():
            missing = f"no {step.creates}"
        elif step.venv and "venv" not in facts.have:
            missing = "first run" if kept is None else "no virtual environment"
        elif gone:
            missing = f"no {gone[0]}"
        else:
            missing = ""
        if force:
            why = "--setup"
        elif missing:
            why = missing
        elif kept is None and step.creates:
            out.append(Decision(step, False, ""))
            continue
        elif kept != key:
            why = f"{', '.join(step.inputs)} changed" if kept is not None and step.inputs else "first run"
        else:
            unchanged = f"{', '.join(step.inputs)} unchanged" if step.inputs else "done before"
            out.append(Decision(step, False, f"Dependencies up to date ({unchanged}): {step.summary}"))
            continue
        if step.tool and step.tool not in facts.have:
            program = "python3's venv module" if step.tool == "python3-venv" else step.tool
            out.append(Decision(step, False, f"Not installing dependencies ({step.summary}): {program} is not in "
                                             "this image (the dev image has it: images.build.recipe: dev)"))
            continue
        out.append(Decision(step, True, f"Installing dependencies ({why}): {step.summary}"))
    return out


def run_script(step: Step, plan: Plan) -> str:
    """The step's commands, one after the other (each in its own subshell), then its key and the
    output folders there now."""
    body = " &&\n".join(f"(\n{command}\n)" for command in step.commands)
    key_file = f"{plan.state_dir}/{step.name}.key"
    dirs = " ".join(OUTPUT_DIRS)
    return (f"{body} &&\nmkdir -p {shlex.quote(plan.state_dir)} &&\n"
            f"{{ printf %s {shlex.quote(plan.keys[step.name])}; for d in {dirs}; do [ -e \"$d\" ] && printf ' %s' \"$d\"; done;"
            f" echo; }} > {shlex.quote(key_file)}\n")


__all__ = ["Decision", "Plan", "Step", "Facts", "plan", "decide", "probe_script", "run_script", "project_id"]
