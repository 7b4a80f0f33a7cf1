"""UTC time as the tool writes it in its files: RFC 3339 with seconds and ``Z``."""

from __future__ import annotations

from datetime import datetime, timezone


def now_utc() -> datetime:
    """Now, in UTC, to the second (what the files can hold)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_time(value: datetime) -> str:
    """``2026-12-01T22:31:07Z``; a naive time is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
