"""The guest's SFTP requests on their way to the host's sftp-server: no set-id bit reaches the host.

Root in the guest may ``chmod 4755`` a project file; sftp-server would set that bit on the host
file (a root-owned setuid program when the host user is root). So the requests that carry a file
mode (OPEN, SETSTAT, FSETSTAT, MKDIR and OpenSSH's ``lsetstat@openssh.com``) lose the setuid,
setgid and sticky bits (07000) here, whatever sftp-server and its sandbox allow. An extension
request this module does not know is renamed so that sftp-server answers "unsupported": a newer
server's extension that sets modes cannot slip by. Device nodes and fifos need no filter: SFTP
version 3 (the only one sftp-server speaks) has no request that makes one.

Only packet headers are read: the bytes of every other request (WRITE's data above all) are
passed on as they came, in the chunks they came in.
"""

from __future__ import annotations

import os
from typing import Callable, List, Union

from ..errors import GuestError

# SFTP version 3 (draft-ietf-secsh-filexfer-02): uint32 length, byte type, uint32 id, ...
SSH_FXP_OPEN = 3
SSH_FXP_SETSTAT = 9
SSH_FXP_FSETSTAT = 10
SSH_FXP_MKDIR = 14
SSH_FXP_EXTENDED = 200
ATTR_SIZE = 0x1
ATTR_UIDGID = 0x2
ATTR_PERMISSIONS = 0x4

DROPPED_MODE_BITS = 0o7000  # setuid, setgid, sticky
_WITH_ATTRS = (SSH_FXP_OPEN, SSH_FXP_SETSTAT, SSH_FXP_FSETSTAT, SSH_FXP_MKDIR)
_HELD = frozenset((*_WITH_ATTRS, SSH_FXP_EXTENDED))  # read whole, checked, then passed on
# sftp-server's own limit (SFTP_MAX_MSG_LENGTH); the requests held here are a path or two long
MAX_HELD_REQUEST = 256 * 1024
LSETSTAT = b"lsetstat@openssh.com"
# OpenSSH's extensions that set no file mode (sshfs uses the first five)
PASSED_EXTENSIONS = frozenset((
    b"posix-rename@openssh.com", b"statvfs@openssh.com", b"fstatvfs@openssh.com", b"hardlink@openssh.com",
    b"fsync@openssh.com", b"limits@openssh.com", b"expand-path@openssh.com", b"copy-data", b"home-directory",
    b"users-groups-by-id@openssh.com",
))

Buffer = Union[bytes, bytearray, memoryview]


class RefusedRequest(GuestError):
    """A request from the guest that is not well-formed SFTP: the mount's stream ends."""


class RequestFilter:
    """Feed it the guest's byte stream in any chunks; it returns what may go to sftp-server."""

    def __init__(self) -> None:
        self._pending = bytearray()  # the start of a packet: its header, or all of a held one
        self._passing = 0  # bytes of the current packet still to pass on untouched

    def feed(self, data: Buffer) -> List[Buffer]:
        out: List[Buffer] = []
        view = memoryview(data)
        pending = self._pending
        while view:
            if self._passing:
                n = min(self._passing, len(view))
                out.append(view[:n])
                view = view[n:]
                self._passing -= n
                continue
            if len(pending) < 5:
                take = 5 - len(pending)
                pending += view[:take]
                view = view[take:]
                if len(pending) < 5:
                    break
            length = int.from_bytes(pending[:4], "big")
            if length < 1:
                raise RefusedRequest("an SFTP packet without a type")
            if pending[4] not in _HELD:
                out.append(bytes(pending))
                self._passing = 4 + length - len(pending)
                pending.clear()
                continue
            if length > MAX_HELD_REQUEST:
                raise RefusedRequest(f"an SFTP request of type {pending[4]} of {length} bytes")
            take = 4 + length - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < 4 + length:
                break
            out.append(checked(pending))
            pending.clear()
        return out


def checked(packet: bytearray) -> bytes:
    """One whole held request, set-id bits dropped and unknown extensions renamed."""
    kind = packet[4]
    offset = 9  # length, type, request id
    if kind in _WITH_ATTRS:
        offset = _skip_string(packet, offset)  # path or handle
        if kind == SSH_FXP_OPEN:
            offset += 4  # pflags
        _drop_set_id(packet, offset)
    elif kind == SSH_FXP_EXTENDED:
        start = offset + 4
        offset = _skip_string(packet, offset)
        name = bytes(packet[start:offset])
        if name == LSETSTAT:
            _drop_set_id(packet, _skip_string(packet, offset))
        elif name not in PASSED_EXTENSIONS:
            packet[start:offset] = b"?" * (offset - start)  # sftp-server: SSH2_FX_OP_UNSUPPORTED
    return bytes(packet)


def _skip_string(packet: bytearray, offset: int) -> int:
    end = offset + 4 + int.from_bytes(_field(packet, offset, 4), "big")
    if end > len(packet):
        raise RefusedRequest("an SFTP string longer than its packet")
    return end


def _field(packet: bytearray, offset: int, size: int) -> bytearray:
    if offset + size > len(packet):
        raise RefusedRequest("an SFTP request shorter than its fields")
    return packet[offset:offset + size]


def _drop_set_id(packet: bytearray, offset: int) -> None:
    """ATTRS at ``offset``: uint32 flags, [uint64 size], [uint32 uid, gid], [uint32 permissions]..."""
    flags = int.from_bytes(_field(packet, offset, 4), "big")
    offset += 4
    if flags & ATTR_SIZE:
        offset += 8
    if flags & ATTR_UIDGID:
        offset += 8
    if flags & ATTR_PERMISSIONS:
        mode = int.from_bytes(_field(packet, offset, 4), "big")
        packet[offset:offset + 4] = (mode & ~DROPPED_MODE_BITS).to_bytes(4, "big")


def pump_requests(recv: Callable[[int], Buffer], fd: int) -> None:
    """Pass the guest's requests read with ``recv`` (b"" at the end) to sftp-server's stdin ``fd``,
    through a :class:`RequestFilter`. Raises :class:`RefusedRequest` on a malformed one."""
    requests = RequestFilter()
    while True:
        data = recv(1 << 18)
        if not data:
            return
        for piece in requests.feed(data):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
