"""How ``inv claude`` reaches the network from its VM: on a restricted VM, only through the host proxy.

A restricted VM (``vm.boot --network restricted``, and what ``inv claude`` boots) has one way out:
QEMU hands the guest's connections to ``10.0.2.100:3128`` to a unix socket in the VM's folder. For
as long as claude runs, the proxy (:mod:`.proxy.server`) listens there: it lets requests through to
the allowlist only (config ``claude.allow`` plus ``--allow``), logs each one in the VM's folder
(``proxy.log``, ``inv claude.log``) and is the API endpoint ``ANTHROPIC_BASE_URL`` points at, where
it puts the real API key (or OAuth token) on each request. The guest gets a placeholder in its place:
the real value never enters the VM.

On an open VM nothing is filtered, so ``inv claude`` refuses one unless told ``--network open``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

from .errors import VMError
from .lifecycle import VM
from .machine.qemu import GUEST_PROXY_HOST, GUEST_PROXY_PORT, GUEST_PROXY_URL
from .options import ClaudeOptions
from .proxy.allowlist import Allowlist, AllowlistError
from .proxy.log import ProxyLog, read_events
from .proxy.server import ProxyServer
from .proxy.upstream import Credentials, Upstream

# What the guest holds instead of a secret the proxy adds (the variable keeps its name, so claude
# still sends that kind of credential, which the proxy then replaces).
PLACEHOLDER = "devops-tasks-placeholder-the-host-proxy-adds-the-real-value"
SECRET_VARS = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")
NO_PROXY = f"localhost,127.0.0.1,::1,{GUEST_PROXY_HOST}"
SUMMARY_HOSTS = 5


class OpenNetworkError(VMError):
    """``inv claude`` on a VM with open networking, without ``--network open``."""


def proxy_env() -> dict[str, str]:
    """What points a guest process at the proxy (both spellings: tools read one or the other)."""
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = env[name.lower()] = GUEST_PROXY_URL
    env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    return env


def check(vm: VM, opts: ClaudeOptions) -> str:
    """Validate ``--network``/``--allow`` and the running VM's mode; the mode to boot it in if it is
    not running. Called before anything starts, so bad input costs nothing."""
    wanted = (opts.network or "restricted").strip().lower()
    if wanted not in ("open", "restricted"):
        raise VMError(f"--network: unknown network mode {opts.network!r} (valid: open, restricted)")
    allowlist(vm, opts)
    if vm.network() == "open" and wanted != "open":
        raise OpenNetworkError(
            f"VM '{vm.name}' runs with open networking and claude runs only on a restricted VM: stop it "
            f"('inv vm.stop --name {vm.name}'; inv claude then boots it restricted), or pass --network open "
            "to run on the open network")
    return wanted


def allowlist(vm: VM, opts: ClaudeOptions) -> Allowlist:
    """Config ``claude.allow`` plus ``--allow`` (an entry that is not ``host[:port]`` is an error)."""
    entries = list(vm.config.claude.allow)
    for text in opts.allow:
        try:
            Allowlist.parse([text])
        except AllowlistError as exc:
            raise AllowlistError(f"--allow: {exc}") from None
        entries.append(text)
    return Allowlist.parse(entries)


@dataclass
class Egress:
    """The network of one claude run. ``server`` is None on an open VM."""

    vm: VM
    mode: str
    server: Optional[ProxyServer] = None
    secrets: set[str] = field(default_factory=set)

    def guest_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` as the guest gets it: on a restricted VM the secrets the proxy adds are placeholders,
        and the proxy and the API endpoint are set."""
        if self.server is None:
            return dict(env)
        out = {key: (PLACEHOLDER if key in SECRET_VARS else value) for key, value in env.items()}
        out.update(proxy_env())
        out["ANTHROPIC_BASE_URL"] = GUEST_PROXY_URL
        return out

    def summary(self) -> str:
        """One line: what the proxy let through and what it blocked in this run."""
        if self.server is None:
            return ""
        allowed, denied = self.server.allowed, Counter()
        for (where, _rule), count in self.server.denied.items():
            denied[where] += count
        if not denied:
            return f"Network: {allowed} request{'s' if allowed != 1 else ''} through the proxy, none blocked"
        shown = [f"{where} x{count}" if count > 1 else where for where, count in denied.most_common(SUMMARY_HOSTS)]
        more = len(denied) - len(shown)
        blocked = sum(denied.values())
        return (f"Network: {blocked} blocked ({', '.join(shown)}{f', {more} more' if more > 0 else ''}), "
                f"{allowed} allowed: 'inv claude.log' shows them, '--allow HOST[:PORT]' opens one")


@contextlib.contextmanager
def proxy(vm: VM, opts: ClaudeOptions, env: Mapping[str, str]) -> Iterator[Egress]:
    """The proxy of one claude run on a restricted VM, listening on the VM's proxy socket until the run
    ends (then its summary is echoed); nothing on an open VM. ``env``: the run's credentials."""
    record = vm.dir.load()
    mode = (record.network if record is not None else "") or "open"
    if mode != "restricted":
        vm.echo("Network: open (nothing filtered: the VM reaches whatever this host reaches)")
        yield Egress(vm, mode)
        return
    rules = allowlist(vm, opts)
    api = _api_upstream(vm, env)
    secrets = {key for key in SECRET_VARS if env.get(key)}
    log = ProxyLog(vm.dir.proxy_log)
    server = ProxyServer(
        rules, log, api=api,
        credentials=Credentials(api_key=env.get("ANTHROPIC_API_KEY", ""),
                                oauth_token=env.get("CLAUDE_CODE_OAUTH_TOKEN", "")),
        self_names=[f"{GUEST_PROXY_HOST}:{GUEST_PROXY_PORT}"],
    )
    socket_path = record.proxy_socket or str(vm.dir.proxy_socket)
    try:
        server.listen_unix(socket_path)
    except OSError as exc:
        log.close()
        raise VMError(f"the proxy cannot listen on {socket_path}: {exc.strerror or exc}") from None
    egress = Egress(vm, mode, server, secrets)
    try:
        with server:
            added = "; the proxy adds the API credential, the VM holds a placeholder" if secrets else ""
            vm.echo(f"Network: restricted: out only through the host proxy (allowlist: {len(rules)} "
                    f"entries{added})")
            yield egress
    finally:
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        vm.echo(egress.summary())


def _api_upstream(vm: VM, env: Mapping[str, str]) -> Upstream:
    """Where the API endpoint forwards: the host's ``ANTHROPIC_BASE_URL`` when the run forwards one,
    else config ``claude.api_url``."""
    url = env.get("ANTHROPIC_BASE_URL", "")
    where = "ANTHROPIC_BASE_URL" if url else "claude.api_url"
    try:
        return Upstream.from_url(url or vm.config.claude.api_url)
    except ValueError as exc:
        raise VMError(f"{where}: {exc}") from None


def events(vm: VM) -> list[dict]:
    """The proxy log of ``vm`` (every run, oldest first)."""
    return list(read_events(vm.dir.proxy_log))
