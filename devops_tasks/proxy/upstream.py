"""The API endpoint's far side: where it forwards (``claude.api_url``) and what it adds there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Upstream:
    """Where the API endpoint forwards to (``claude.api_url``)."""

    scheme: str
    host: str
    port: int
    prefix: str = ""  # the URL's path without its trailing slash

    @classmethod
    def from_url(cls, url: str) -> "Upstream":
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an http:// or https:// URL without query")
        if parts.username or parts.password:
            raise ValueError(f"{url!r} holds a user or password: the proxy adds the credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"{url!r}: {exc}") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    """What the API endpoint adds. Never logged, never printed."""

    api_key: str = field(default="", repr=False)
    oauth_token: str = field(default="", repr=False)

    def header_for(self, headers: Sequence[tuple[str, str]]) -> Optional[tuple[str, str]]:
        """The header to send: the kind the guest used (its placeholder), else the key, else the token."""
        sent = {name.lower(): value for name, value in headers}
        bearer = sent.get("authorization", "").lower().startswith("bearer ")
        if bearer and self.oauth_token:
            return "Authorization", f"Bearer {self.oauth_token}"
        if "x-api-key" in sent and self.api_key:
            return "x-api-key", self.api_key
        if self.api_key:
            return "x-api-key", self.api_key
        if self.oauth_token:
            return "Authorization", f"Bearer {self.oauth_token}"
        return None
