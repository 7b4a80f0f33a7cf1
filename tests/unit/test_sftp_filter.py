"""The mount's SFTP request filter, packet by packet: set-id bits dropped, everything else intact.

The same filter against the real sftp-server and sshfs: tests/unit/test_guest_mount.py (a local
stand-in for the guest) and tests/e2e/test_workspace_e2e.py (the VM).
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from devops_tasks.guest import sftp_filter
from devops_tasks.guest.sftp_filter import RefusedRequest, RequestFilter


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def attrs(mode=None, size=None, uidgid=None, times=None, extended=()) -> bytes:
    flags, fields = 0, b""
    if size is not None:
        flags |= 0x1
        fields += struct.pack(">Q", size)
    if uidgid is not None:
        flags |= 0x2
        fields += struct.pack(">II", *uidgid)
    if mode is not None:
        flags |= 0x4
        fields += struct.pack(">I", mode)
    if times is not None:
        flags |= 0x8
        fields += struct.pack(">II", *times)
    if extended:
        flags |= 0x80000000
        fields += struct.pack(">I", len(extended)) + b"".join(string(k) + string(v) for k, v in extended)
    return struct.pack(">I", flags) + fields


def passed(data: bytes, chunks=None) -> bytes:
    """``data`` through a filter in ``chunks`` (sizes; default: one chunk)."""
    requests = RequestFilter()
    out = []
    if chunks is None:
        chunks = [len(data)]
    start = 0
    for size in chunks:
        out += requests.feed(data[start:start + size])
        start += size
    assert start >= len(data)
    return b"".join(bytes(piece) for piece in out)


REQUEST_ID = struct.pack(">I", 7)
FULL = dict(size=4096, uidgid=(1000, 1000), times=(1, 2), extended=[(b"x@y", b"z")])


@pytest.mark.parametrize("mode, kept", [(0o104755, 0o100755), (0o2755, 0o755), (0o1777, 0o777), (0o7777, 0o777),
                                        (0o644, 0o644)])
def test_setstat_loses_the_set_id_bits(mode, kept):
    before = packet(9, REQUEST_ID + string(b"/p/file") + attrs(mode=mode, **FULL))
    after = packet(9, REQUEST_ID + string(b"/p/file") + attrs(mode=kept, **FULL))
    assert passed(before) == after


def test_open_fsetstat_mkdir_and_lsetstat_lose_them_too():
    cases = [
        (3, REQUEST_ID + string(b"/p/new") + struct.pack(">I", 0x1A), 0o4755, 0o755),  # OPEN: pflags, then attrs
        (10, REQUEST_ID + string(b"handle-1"), 0o6755, 0o755),  # FSETSTAT
        (14, REQUEST_ID + string(b"/p/dir"), 0o3777, 0o777),  # MKDIR
        (200, REQUEST_ID + string(b"lsetstat@openssh.com") + string(b"/p/file"), 0o4700, 0o700),
    ]
    for kind, head, mode, kept in cases:
        assert passed(packet(kind, head + attrs(mode=mode, size=1))) == packet(kind, head + attrs(mode=kept, size=1))
        plain = packet(kind, head + attrs(size=1, times=(3, 4)))  # no mode: nothing to change
        assert passed(plain) == plain


def test_unknown_extensions_are_renamed_known_ones_pass():
    for name in sorted(sftp_filter.PASSED_EXTENSIONS):
        request = packet(200, REQUEST_ID + string(name) + string(b"/p/a") + string(b"/p/b"))
        assert passed(request) == request
    unknown = packet(200, REQUEST_ID + string(b"chmod-setuid@example.com") + string(b"/p/a") + attrs(mode=0o4755))
    renamed = passed(unknown)
    assert len(renamed) == len(unknown)
    assert b"chmod-setuid" not in renamed and string(b"?" * 24) in renamed


def test_other_requests_and_data_pass_untouched_in_any_chunks():
    rng = random.Random(4)
    write = packet(6, REQUEST_ID + string(b"handle-1") + struct.pack(">Q", 0) + string(os.urandom(70000)))
    read = packet(5, REQUEST_ID + string(b"handle-1") + struct.pack(">QI", 0, 65536))
    setstat = packet(9, REQUEST_ID + string(b"/p/f") + attrs(mode=0o104755))
    masked = packet(9, REQUEST_ID + string(b"/p/f") + attrs(mode=0o100755))
    # mode bytes that look like a SETSTAT inside WRITE's data are data: never touched
    fake = packet(6, REQUEST_ID + string(b"h") + struct.pack(">Q", 0) + string(setstat * 3))
    init = packet(1, struct.pack(">I", 3))
    stream = init + write + setstat + read + fake + setstat + write
    expected = init + write + masked + read + fake + masked + write
    assert passed(stream) == expected
    assert passed(stream, [1] * len(stream)) == expected
    for _ in range(20):
        sizes, left = [], len(stream)
        while left > 0:
            sizes.append(rng.choice([1, 2, 3, 4, 5, 6, 9, 100, 4096, 65536, 200000]))
            left -= sizes[-1]
        assert passed(stream, sizes) == expected


def test_data_is_passed_as_views_not_copies():
    """A 256 KiB WRITE comes out as slices of the chunks that went in (header copied only)."""
    payload = os.urandom(1 << 18)
    write = packet(6, REQUEST_ID + string(b"h") + struct.pack(">Q", 0) + string(payload))
    out = RequestFilter().feed(write)
    assert sum(len(piece) for piece in out) == len(write)
    assert [type(piece) for piece in out] == [bytes, memoryview] and len(out[0]) == 5


@pytest.mark.parametrize("bad, why", [
    (packet(9, REQUEST_ID + struct.pack(">I", 1000) + b"/p"), "string longer than its packet"),
    (packet(9, REQUEST_ID + string(b"/p") + struct.pack(">I", 0x4) + b"\0\0"), "shorter than its fields"),
    (packet(3, REQUEST_ID + string(b"/p")), "shorter than its fields"),
    (struct.pack(">I", 0), "without a type"),
    (struct.pack(">IB", 10 << 20, 9), "of 10485760 bytes"),
])
def test_malformed_requests_end_the_stream(bad, why):
    with pytest.raises(RefusedRequest, match=why):
        RequestFilter().feed(bad + b"\0" * 16)


def test_pump_requests_writes_everything_to_the_server(tmp_path):
    stream = packet(9, REQUEST_ID + string(b"/p/f") + attrs(mode=0o4755)) + packet(4, REQUEST_ID + string(b"h"))
    chunks = [stream[:3], stream[3:20], stream[20:], b""]
    read_end, write_end = os.pipe()
    try:
        sftp_filter.pump_requests(lambda size: chunks.pop(0), write_end)
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as pipe:
            read_end = -1
            got = pipe.read()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert got == packet(9, REQUEST_ID + string(b"/p/f") + attrs(mode=0o755)) + packet(4, REQUEST_ID + string(b"h"))
