"""Refusing a store on a network filesystem, where SQLite's write-ahead log loses or corrupts commits.

SQLite: "All processes using a database must be on the same host computer; WAL does not work over a network
filesystem." Its -shm index is shared memory, which processes on two hosts do not share, and the fcntl locks
that guard it are unreliable on NFS and its kin.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rollouttap.errors import StoreError

# mountinfo rather than /proc/mounts: both give each mount point (a bind mount under its own point, with the
# filesystem type of its origin) with the same octal escapes, but mountinfo's fields are fixed and documented
# (proc_pid_mountinfo(5)), with the filesystem's own options (9p's trans=) apart from the per-mount flags.
# Module level, so that tests can point it at a fixture file.
MOUNTINFO = Path("/proc/self/mountinfo")
ALLOW_ENV = "ROLLOUTTAP_ALLOW_NETWORK_STORE"

# Where one file is written from several hosts, or its locks and shared memory are not the kernel's own.
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4",  # fcntl locks are the server's (lockd, NFSv4 leases): lost to a restart or a network blip
    "cifs", "smb3", "smbfs",  # SMB; smb3 is the type of a cifs mount made with -t smb3
    "afs", "coda",
    # Parallel filesystems of HPC and GPU clusters: every node mounts the same files.
    "lustre", "gpfs", "beegfs", "fhgfs", "ceph", "glusterfs", "pvfs2", "panfs", "wekafs",
    # Shared-disk cluster filesystems: local block devices, but one disk mounted by many hosts.
    "gfs2", "ocfs2",
    # FUSE: "fuse.<program>"; only the programs known to talk to a server. Others (lxcfs, ntfs-3g as fuseblk,
    # squashfuse, ...) are local, and an unknown program is let through rather than guessed at.
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph-fuse", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone",
    "fuse.juicefs", "fuse.blobfuse2", "fuse.mountpoint-s3", "fuse.goofys", "fuse.mfs", "fuse.lizardfs",
    "fuse.quobyte", "orangefs",
})
# Not listed: virtiofs, and 9p except over a network transport. Both mostly carry a folder of the same
# machine into a VM or sandbox (QEMU virtio-9p, WSL2's /mnt/c, ChromeOS, gVisor), where
# every writer runs under one kernel; refusing them would leave some sandboxes no place for the store at all.
NETWORK_9P_TRANSPORTS = frozenset({"tcp", "rdma"})

_ESCAPE = re.compile(r"\\([0-7]{3})")

log = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: where a filesystem is mounted, its type, source and own options."""

    point: str
    fstype: str
    source: str = ""
    options: str = ""


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in ``text`` (/proc/self/mountinfo), in its order; malformed lines are skipped."""
    return [mount for line in text.splitlines() if (mount := _parse_line(line)) is not None]


def mount_of(path: str, mountinfo: str) -> Mount | None:
    """The mount holding ``path`` (absolute, symlinks resolved): the longest mount point above it."""
    # A mount hidden under a later one on a folder above it still matches here: rare enough to leave be.
    best: Mount | None = None
    best_length = -1
    for line in mountinfo.splitlines():
        # Only the lines whose mount point is above the path are parsed whole: a node can have thousands.
        fields = line.split(" ", 5)
        point = _unescape(fields[4]).rstrip("/") if len(fields) == 6 else None
        if point is None or (path != point and not path.startswith(point + "/")):
            continue
        # ">=": of two mounts on one point the later covers the earlier (autofs, then the NFS it mounted).
        if len(point) >= best_length and (mount := _parse_line(line)) is not None:
            best, best_length = mount, len(point)
    return best


def _parse_line(line: str) -> Mount | None:
    fields = line.split(" ")
    try:
        end = fields.index("-", 6)  # optional fields (shared:N, master:N) run up to a lone "-"
        point, fstype, source, options = fields[4], fields[end + 1], fields[end + 2], fields[end + 3]
    except (ValueError, IndexError):
        return None
    return Mount(_unescape(point), _unescape(fstype), _unescape(source), _unescape(options))


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in names as \040, \011, \012, \134.
    return _ESCAPE.sub(_octal, field) if "\\" in field else field


def _octal(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 8))


def is_network(mount: Mount) -> bool:
    """Whether ``mount`` is a filesystem that other hosts write too, or whose locks SQLite cannot trust."""
    if mount.fstype == "9p":
        transports = {opt.partition("=")[2] for opt in mount.options.split(",") if opt.startswith("trans=")}
        return bool(transports & NETWORK_9P_TRANSPORTS)
    return mount.fstype in NETWORK_FS_TYPES


def check_local(path: Path, environ: Mapping[str, str] = os.environ) -> None:
    """Raise StoreError if the store file ``path`` would lie on a network filesystem, unless allowed."""
    resolved = os.path.realpath(path)  # also mounts an automounted folder on the way (autofs)
    mount = _mount_cached(str(MOUNTINFO), resolved)
    if mount is None or not is_network(mount):
        return
    where = f"{path}" if resolved == str(path) else f"{path} (which is {resolved})"
    if environ.get(ALLOW_ENV) == "1":
        if resolved not in _warned:  # once per file: the store is opened again and again
            _warned.add(resolved)
            log.warning("store %s is on a network filesystem (%s at %s); used anyway, as %s=1 says",
                        where, mount.fstype, mount.point, ALLOW_ENV)
        return
    raise StoreError(
        f"store {where} is on a network filesystem: {mount.fstype} mounted at {mount.point}. SQLite's "
        "write-ahead log, which the store uses, loses or corrupts captured flows there (its locks and shared "
        "memory do not work across hosts). Put the store on a local disk, e.g. under /tmp or the node's local "
        f"scratch, one store per node; or, if this filesystem is known to be safe, set {ALLOW_ENV}=1")


@functools.lru_cache(maxsize=256)
def _mount_cached(mountinfo: str, resolved: str) -> Mount | None:
    # The store is opened again and again (each Store, each proxy start), and a node can have thousands of
    # mounts: the verdict for a file is taken once per process. A filesystem mounted over it later goes unseen.
    try:
        with open(mountinfo, encoding=sys.getfilesystemencoding(), errors="surrogateescape") as file:
            text = file.read()
    except OSError:  # no /proc (not Linux, or hidden): nothing to tell by
        return None
    return mount_of(resolved, text)
