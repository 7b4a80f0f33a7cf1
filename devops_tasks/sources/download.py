"""The one resumable, verified HTTP download every image source uses.

``download_file(url, dest, ...)``:

* streams to ``<dest>.part`` beside the image, hashing (sha256) in the same pass, in 1 MiB chunks
  (memory stays flat whatever the image size);
* remembers the server's validator (strong ETag, else Last-Modified) in ``<dest>.part.json`` and,
  after an interruption (cut connection, timeout, Ctrl-C, crash), resumes with
  ``Range: bytes=N-`` + ``If-Range``; the existing part is hashed first so the final sha256 covers
  the whole file;
* a server that ignores the range (200) restarts cleanly from byte 0; a 416 discards the part and
  restarts once; a ``Content-Range`` that does not start where we asked is refused (part
  discarded);
* retries cut connections and 5xx answers a bounded number of times with short back-off, giving
  up sooner when attempts make no progress;
* on success: fsync, compare with the expected sha256 (mismatch → :class:`ChecksumError`, part
  deleted, the existing image untouched), then an atomic rename onto ``dest``;
* runs the caller's ``check`` on the verified part before the rename (the image sources refuse a
  qcow2 that names a backing or data file there), deleting the part when it refuses;
* holds ``fsutil.file_lock(<dest>.lock)`` so one image is downloaded by one process at a time;
* speaks HTTP through :mod:`devops_tasks.sources.http`: https (plain http on loopback only),
  the caller's ``headers`` (credentials) to the origin of ``url`` only.

:class:`HTTPSource` is the base of the sources that download over HTTP: one place that calls
:func:`download_file` and reads their small documents with a size cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import requests
import urllib3

from ..errors import ChecksumError, DevopsError, ImageError, SourceError
from ..fsutil import atomic_write_text, file_lock, fsync_dir, is_locked
from . import ImageSource, Progress, SourceConfig
from .http import Document, Reauth, get_document, open_url, reason, redact
from .qcow2 import check_image

CHUNK = 1 << 20
WRITEBACK_EVERY = 32 << 20
MAX_STALLS = 3  # consecutive attempts that received no byte before giving up

Check = Callable[[Path], None]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass
class DownloadResult:
    """What :func:`download_file` delivered. ``received`` counts body bytes fetched by this call
    (the resumed remainder, not what an earlier run already stored)."""

    sha256: str
    size: int
    validator: str
    url: str
    received: int
    attempts: int


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def part_meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".lock")


class _Hasher:
    """sha256 computed on a second thread (hashlib releases the GIL), so hashing overlaps the
    socket reads and file writes. Chunks are read into a small pool of reusable 1 MiB buffers: at
    most ``depth`` wait to be hashed, so memory stays flat whatever the file size."""

    def __init__(self, depth: int = 8):
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._free: queue.Queue = queue.Queue()
        self._allocated = 0
        self._limit = depth + 2
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, buf = item
            self._hash.update(data)
            if buf is not None:
                self._free.put(buf)

    def buffer(self) -> bytearray:
        """A free 1 MiB buffer (blocks while the hasher is behind)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._allocated < self._limit:
                self._allocated += 1
                return bytearray(CHUNK)
            return self._free.get()

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def update(self, data, buf: Optional[bytearray] = None) -> None:
        """Hash ``data``; ``buf`` (the pool buffer under ``data``) returns to the pool afterwards."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._queue.put((data, buf))

    def close(self) -> None:
        """Wait until every queued chunk is hashed (and stop the thread)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def reset(self) -> None:
        self.close()
        self._hash = hashlib.sha256()

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


class _Transient(Exception):
    """A failure worth another attempt (cut connection, timeout, 5xx)."""


class _Download:
    """One run of :func:`download_file` (whose docstring says what each option means)."""

    def __init__(
        self,
        url: str,
        dest: Path,
        *,
        headers: Optional[Mapping[str, str]] = None,
        expected_sha256: str = "",
        size: int = -1,
        progress: Optional[Progress] = None,
        quiet: bool = False,
        timeout: tuple[float, float] = (10.0, 60.0),
        retries: int = 20,
        backoff: float = 0.25,
        session: Optional[requests.Session] = None,
        label: str = "",
        reauth: Optional[Reauth] = None,
        check: Optional[Check] = None,
    ):
        self.url = url
        self.shown_url = redact(url)
        self.dest = Path(dest)
        self.part = part_path(self.dest)
        self.meta = part_meta_path(self.dest)
        self.headers = dict(headers or {})
        self.expected = (expected_sha256 or "").strip().lower()
        if self.expected.startswith("sha256:"):
            self.expected = self.expected[len("sha256:") :]
        self.size = size
        self.progress = progress
        self.quiet = quiet
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.own_session = session is None
        self.session = session or requests.Session()
        self.label = label or self.dest.name
        self.reauth = reauth
        self.check = check

        self.hasher = _Hasher()
        self.offset = 0
        self.total = -1
        self.validator = ""
        self.received = 0
        self.attempts = 0
        self.restarted_416 = False
        self.bar = None

    # -- the part file and its metadata ------------------------------------------------------
    def _discard(self) -> None:
        for path in (self.part, self.meta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.hasher.reset()
        self.offset = 0
        self.validator = ""

    def _save_meta(self) -> None:
        body = {"url": self.url, "validator": self.validator, "total": self.total, "sha256": self.expected}
        atomic_write_text(self.meta, json.dumps(body) + "\n")

    def _load_part(self) -> None:
        """Reuse an earlier ``.part`` only when it belongs to this URL/checksum and can be resumed."""
        if not self.part.exists():
            with contextlib.suppress(FileNotFoundError):
                self.meta.unlink()
            return
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        usable = (
            isinstance(meta, dict)
            and meta.get("url") == self.url
            and (not self.expected or not meta.get("sha256") or meta.get("sha256") == self.expected)
            and (meta.get("validator") or self.expected)
        )
        if not usable:
            self._discard()
            return
        self.validator = str(meta.get("validator") or "")
        self.total = int(meta.get("total", -1) or -1)
        with open(self.part, "rb") as handle:
            while True:
                chunk = handle.read(CHUNK)
                if not chunk:
                    break
                self.hasher.update(chunk)
                self.offset += len(chunk)
        if 0 <= self.total < self.offset:
            self._discard()
            self.total = -1

    # -- HTTP --------------------------------------------------------------------------------
    def _request(self, extra: dict[str, str]) -> requests.Response:
        """GET through :func:`~devops_tasks.sources.http.open_url` (credentials to the origin only)."""
        try:
            return open_url(self.session, self.url, timeout=self.timeout,
                            headers={"Accept-Encoding": "identity", **extra},
                            credentials=self.headers, reauth=self.reauth)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise _Transient(f"{self.shown_url}: {reason(exc)}") from None

    def _attempt(self) -> bool:
        """One request; True when the body is complete, False to start over at once."""
        extra: dict[str, str] = {}
        if self.offset > 0:
            extra["Range"] = f"bytes={self.offset}-"
            if self.validator:
                extra["If-Range"] = self.validator
        resp = self._request(extra)
        with resp:
            shown = redact(resp.final_url)  # type: ignore[attr-defined]
            status = resp.status_code
            if status == 416:
                match = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", resp.headers.get("Content-Range", ""))
                if match and self.offset > 0 and int(match.group(1)) == self.offset:
                    self.total = self.offset  # the part already holds the whole file
                    return True
                if self.restarted_416 or self.offset == 0:
                    self._discard()
                    raise SourceError(f"{shown}: the server refused the byte range (HTTP 416)")
                self.restarted_416 = True
                self._discard()
                return False
            if status in (408, 425, 429) or status >= 500:
                raise _Transient(f"{shown}: HTTP {status} {resp.reason or ''}".rstrip())
            if status == 404:
                raise SourceError(f"{shown}: not found (HTTP 404)")
            if status in (401, 403):
                raise SourceError(f"{shown}: access denied (HTTP {status}); check the credentials")
            if status not in (200, 206):
                raise SourceError(f"{shown}: unexpected HTTP {status} {resp.reason or ''}".rstrip())

            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise SourceError(
                    f"{shown}: the server sends the file with Content-Encoding {encoding}, "
                    "which cannot be resumed or verified byte for byte"
                )
            if status == 206:
                match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                start = int(match.group(1)) if match else -1
                if start != self.offset:
                    asked = self.offset
                    self._discard()
                    got = resp.headers.get("Content-Range", "(none)")
                    raise SourceError(
                        f"{shown}: asked for bytes {asked}- but the server sent Content-Range {got}; "
                        "the partial download was discarded, run the install again"
                    )
                total = int(match.group(3)) if match.group(3) != "*" else -1
            else:
                if self.offset:
                    self._discard()  # range ignored or the file changed: start over from byte 0
                length = resp.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else -1
            if self.size >= 0 and total >= 0 and total != self.size:
                self._discard()
                raise SourceError(
                    f"{shown}: the server sends {total} bytes but {self.size} were expected"
                )
            self.total = total
            validator = _validator(resp)
            if self.offset == 0 or validator:
                self.validator = validator
            self._save_meta()
            self._bar_update_total()
            self._stream(resp)
        if self.total >= 0 and self.offset < self.total:
            raise _Transient(f"{shown}: connection closed at {self.offset} of {self.total} bytes")
        return True

    def _stream(self, resp: requests.Response) -> None:
        try:
            handle = open(self.part, "ab", buffering=0)
        except OSError as exc:
            raise ImageError(f"{self.part}: cannot write: {exc.strerror or exc}") from None
        with handle:
            if handle.tell() != self.offset:  # the part changed under us: trust nothing
                handle.truncate(0)
                self._discard()
                raise _Transient(f"{self.part}: partial file changed during download")
            kicked = self.offset
            try:
                for data, buf in self._chunks(resp):
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[handle.write(view) :]
                    except OSError as exc:
                        if buf is not None:
                            self.hasher.give_back(buf)
                        raise ImageError(
                            f"{self.part}: cannot write: {exc.strerror or exc}; "
                            "free some space and run the install again to resume"
                        ) from None
                    size = len(data)
                    self.hasher.update(data, buf)
                    self.offset += size
                    self.received += size
                    if self.offset - kicked >= WRITEBACK_EVERY:
                        _start_writeback(handle.fileno(), kicked, self.offset - kicked)
                        kicked = self.offset
                    if self.bar is not None:
                        self.bar.update(size)
                    if self.progress is not None:
                        self.progress(self.offset, self.total)
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                    http.client.HTTPException, OSError, ValueError) as exc:
                raise _Transient(f"{self.shown_url}: {reason(exc)}") from None

    def _chunks(self, resp: requests.Response):
        """Body chunks as (data, pool buffer or None), each byte kept even when the connection
        breaks mid-chunk (requests' iter_content drops a partly received chunk).

        Fast path: read straight from http.client into pooled buffers (one copy from the socket);
        otherwise urllib3's raw reads."""
        raw = resp.raw
        fp = getattr(raw, "_fp", None)
        if isinstance(fp, http.client.HTTPResponse) and not getattr(raw, "_fp_bytes_read", 0):
            while True:
                buf = self.hasher.buffer()
                try:
                    count = fp.readinto(buf)
                except BaseException:
                    self.hasher.give_back(buf)
                    raise
                if not count:
                    self.hasher.give_back(buf)
                    return
                yield memoryview(buf)[:count], buf
        while True:
            chunk = raw.read(CHUNK, decode_content=False)
            if not chunk:
                return
            yield chunk, None

    # -- progress bar ------------------------------------------------------------------------
    def _bar_update_total(self) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total if self.total >= 0 else None,
                initial=self.offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.label,
                file=sys.stderr,
                disable=True if self.quiet else None,
                dynamic_ncols=True,
            )
        else:
            self.bar.total = self.total if self.total >= 0 else None
            self.bar.n = self.offset
            self.bar.refresh()

    # -- the whole thing ---------------------------------------------------------------------
    def run(self) -> DownloadResult:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path(self.dest)
        if is_locked(lock):
            print(f"Waiting for another download of {self.dest.name} to finish...", file=sys.stderr, flush=True)
        with file_lock(lock):
            try:
                self._load_part()
                self._loop()
                return self._finish()
            finally:
                self.hasher.close()
                if self.bar is not None:
                    self.bar.close()
                if self.own_session:
                    self.session.close()

    def _loop(self) -> None:
        if self.expected and self.offset > 0 and self.offset == self.total:
            return  # an earlier run got every byte but stopped before the rename: just verify
        used = 0
        stalls = 0
        while True:
            before = self.offset
            self.attempts += 1
            try:
                if self._attempt():
                    return
                continue
            except _Transient as exc:
                reason = str(exc)
            progressed = self.offset > before
            used += 1
            stalls = 0 if progressed else stalls + 1
            if used > self.retries or stalls >= MAX_STALLS:
                kept = f"; {self.offset} bytes kept, run the install again to resume" if self.offset else ""
                raise SourceError(f"download failed after {self.attempts} attempts: {reason}{kept}")
            if not progressed:
                time.sleep(min(self.backoff * (2 ** (stalls - 1)), 2.0))

    def _finish(self) -> DownloadResult:
        if self.total >= 0 and self.offset != self.total:
            self._discard()
            raise SourceError(f"{self.shown_url}: got {self.offset} bytes, expected {self.total}")
        try:
            fd = os.open(self.part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            self.part.touch()  # an empty body still becomes a file
        digest = self.hasher.hexdigest()
        if self.expected and digest != self.expected:
            self._discard()
            raise ChecksumError(
                f"{self.shown_url}: sha256 mismatch (expected {self.expected}, got {digest}); "
                f"the download was deleted and {self.dest.name} was left as it was"
            )
        if self.check is not None:
            try:
                self.check(self.part)
            except DevopsError:
                self._discard()
                raise
        try:
            os.replace(self.part, self.dest)
            fsync_dir(self.dest.parent)
        except OSError as exc:
            raise ImageError(f"{self.dest}: cannot install the download: {exc.strerror or exc}") from None
        with contextlib.suppress(FileNotFoundError):
            self.meta.unlink()
        return DownloadResult(
            sha256=digest,
            size=self.offset,
            validator=self.validator,
            url=self.url,
            received=self.received,
            attempts=self.attempts,
        )


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now (Linux: POSIX_FADV_DONTNEED starts
    asynchronous writeback of dirty pages), so the final fsync has little left to wait for."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _validator(resp: requests.Response) -> str:
    """A value usable in ``If-Range``: a strong ETag, else Last-Modified, else ''."""
    etag = resp.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified", "").strip()


def download_file(url: str, dest: Path | str, **options) -> DownloadResult:
    """Download ``url`` to ``dest`` resumably and verified; see the module docstring.

    Options (all keyword): ``headers`` (credentials) go only to the origin of ``url``, never to a
    redirect target elsewhere; ``expected_sha256`` (hex, optionally ``sha256:``-prefixed) is
    checked before ``dest`` is replaced; ``size`` (when >= 0) is the expected length;
    ``progress(done, total)``; ``quiet`` hides the bar; ``timeout`` (connect, read) seconds;
    ``retries`` and ``backoff`` bound the retries; ``session``; ``label`` names the bar;
    ``reauth(resp)`` is called once on a 401 from the origin and returns fresh headers (e.g. a new
    registry token); ``check(part)`` runs on the verified file before it replaces ``dest`` and
    raises a :class:`DevopsError` to refuse it. KeyboardInterrupt keeps the ``.part`` for the next
    run.
    """
    return _Download(url, Path(dest), **options).run()


class HTTPSource(ImageSource):
    """An image source spoken over HTTP: one session, small documents read with a size cap, and
    the image fetched by the one verified download (published sha256, then the qcow2 check, then
    the atomic rename)."""

    def __init__(self, cfg: Optional[SourceConfig] = None, session: Optional[requests.Session] = None):
        super().__init__(cfg)
        self.session = session or requests.Session()

    def get_document(
        self,
        url: str,
        *,
        headers: Optional[Mapping[str, str]] = None,
        credentials: Optional[dict[str, str]] = None,
        reauth: Optional[Reauth] = None,
        method: str = "GET",
    ) -> Document:
        """A JSON answer, checksum file or token (at most ``http.MAX_DOCUMENT`` bytes)."""
        return get_document(self.session, url, timeout=self.cfg.timeout, headers=headers,
                            credentials=credentials, reauth=reauth, method=method)

    def download_url(
        self,
        url: str,
        dest: Path,
        progress: Optional[Progress],
        *,
        credentials: Optional[Mapping[str, str]] = None,
        size: int = -1,
        reauth: Optional[Reauth] = None,
    ) -> DownloadResult:
        """Download the image at ``url`` into ``dest``, verified against ``expected_sha256``."""
        return download_file(
            url,
            dest,
            headers=credentials,
            expected_sha256=self.expected_sha256,
            size=size,
            progress=progress,
            quiet=self.cfg.quiet,
            timeout=self.cfg.timeout,
            retries=self.cfg.retries,
            session=self.session,
            label=self.cfg.image_name,
            reauth=reauth,
            check=self._check_image,
        )

    def _check_image(self, part: Path) -> None:
        check_image(part, name=f"{self.kind}: {self.cfg.image_name}")
