"""mitmproxy's CA, made once per configuration directory however many proxies start at the same moment.

mitmdump makes its CA at start-up when ``confdir`` has none, and reads back the key file it just wrote. Proxies
that start together on a fresh directory (the ranks of a multi-GPU job, each starting its manager's proxy, or
``proxies=N`` of two managers) each make their own and overwrite each other's files: each proxy then signs with
its own CA while the agents trust the one whose certificate file was written last, and every HTTPS call of the
other proxies' agents fails verification. Making the CA here first leaves mitmdump nothing to make: one process
at a time (a lock), in a staging folder, the key published with a hard link that fails where a key already is
(so that nodes sharing the folder over NFS, which a lock does not reach across, keep the first key made), then
its certificate files. A certificate file missing beside a key (a process that died between the two) is
written again from the key file, which holds the certificate too.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rollouttap.errors import ProxyError

# mitmproxy.options' CONF_DIR, CONF_BASENAME and KEY_SIZE, written out so the manager need not import
# mitmproxy (a tenth of a second) to find the directory.
DEFAULT_CONFDIR = "~/.mitmproxy"
BASENAME = "mitmproxy"
DEFAULT_KEY_SIZE = 2048
CERT_FILE = f"{BASENAME}-ca-cert.pem"  # what agents are told to trust
LOCK_FILE = ".rollouttap-ca.lock"
STAGING_PREFIX = ".rollouttap-ca-"
STALE_STAGING_S = 600.0  # a staging folder this old was left by a process that died making a CA
MAKE_TIMEOUT_S = 120.0  # RSA key generation takes well under a second; a child still at it has hung
# flock errors of a filesystem that has no locks (NFSv3 without lockd, Lustre mounted noflock).
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
_CERT_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\r?\n?", re.S)


def ca_key_file(confdir: str | Path) -> Path:
    """The file whose presence tells mitmdump that the CA exists (the key and certificate)."""
    return Path(os.path.expanduser(confdir)) / f"{BASENAME}-ca.pem"


def ensure_ca(confdir: str | Path = DEFAULT_CONFDIR, key_size: int = DEFAULT_KEY_SIZE, timeout: float = 60.0,
              local_locks: Path | None = None) -> bool:
    """Make mitmproxy's CA in ``confdir`` unless it is there; True when this call made it. Safe to call from
    many processes at once: one makes it, the others wait for it (up to ``timeout`` seconds) and make none.
    ``local_locks``: where to lock when ``confdir`` has no locks (default: a folder of this user's in the temp
    folder). Raises ProxyError when the CA cannot be made, OSError when the folder cannot be written."""
    key_file = ca_key_file(confdir)
    directory = key_file.parent
    if key_file.exists() and (directory / CERT_FILE).exists():
        return False
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with _locked(directory, deadline, local_locks):
        _remove_stale_staging(directory)
        made = False
        if not key_file.exists():
            made = _make_and_publish(directory, key_file.name, key_size, deadline)
        if not (directory / CERT_FILE).exists():  # a maker died between the key and its certificate
            _restore_certificate(key_file, directory / CERT_FILE)
    return made


def _make_and_publish(directory: Path, key_name: str, key_size: int, deadline: float) -> bool:
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        _make_ca(staging, key_size, max(deadline - time.monotonic(), 1.0))
        return _publish(staging, directory, key_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_ca(staging: Path, key_size: int, timeout: float) -> None:
    # A process of its own (addon/make_ca.py): mitmproxy writes the key under a process-wide umask.
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "rollouttap.addon.make_ca", str(staging), str(key_size)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=min(timeout, MAKE_TIMEOUT_S))
    except subprocess.TimeoutExpired as exc:
        raise ProxyError(f"making mitmproxy's CA in {staging.parent} took over {exc.timeout:.0f}s") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ProxyError(f"cannot make mitmproxy's CA in {staging.parent}: {reason}")


def _publish(staging: Path, directory: Path, key_name: str) -> bool:
    """Move the staged CA in, the key first; False (and nothing moved) when another key got there first."""
    staged, published = staging / key_name, directory / key_name
    try:
        os.link(staged, published)  # whole or not at all, and never over another
    except FileExistsError:
        # NFS may answer a retried link "exists" although the first attempt made it: then it is ours.
        if not os.path.samefile(staged, published):
            return False
    except OSError:  # a filesystem without hard links: the lock alone keeps this host's processes apart
        os.replace(staged, published)
    for name in os.listdir(staging):
        if name != key_name:
            os.replace(staging / name, directory / name)
    return True


def _restore_certificate(key_file: Path, cert_file: Path) -> None:
    """Write the certificate agents trust from the key file (key and certificate PEM, as mitmproxy keeps it)."""
    found = _CERT_PEM.search(key_file.read_bytes())
    if found is None:
        raise ProxyError(f"{key_file} holds no certificate: remove it (and its {cert_file.name}) to make a new CA")
    fd, tmp = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=cert_file.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(found.group(0))
        os.chmod(tmp, 0o644)  # a public certificate, as mitmproxy writes it
        os.replace(tmp, cert_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def _locked(directory: Path, deadline: float, local_locks: Path | None) -> Iterator[None]:
    """Held by one process at a time: a lock file in ``directory``, or, where that filesystem has no locks,
    one in a folder of this user's on this host, named after it."""
    handle = open(directory / LOCK_FILE, "a")
    try:
        try:
            _flock(handle, deadline, directory)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            handle.close()
            name = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:16]
            handle = open(_private_folder(local_locks or Path(tempfile.gettempdir()) / f"rollouttap-{os.getuid()}")
                          / f"ca-{name}.lock", "a")
            _flock(handle, deadline, directory)
        yield
    finally:
        handle.close()  # releases the lock, as the process's end would


def _private_folder(path: Path) -> Path:
    """``path`` as a folder only this user can enter (refused if another user made it first)."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ProxyError(f"{path} is not a private folder of this user: cannot lock mitmproxy's CA there")
    return path


def _flock(handle: IO[str], deadline: float, directory: Path) -> None:
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ProxyError(f"another process has been making mitmproxy's CA in {directory} for too long "
                                 f"(it holds {handle.name})") from None
            time.sleep(0.05)


def _remove_stale_staging(directory: Path) -> None:
    """Staging folders and files (a private key among them) of processes that died making a CA."""
    now = time.time()
    for entry in os.scandir(directory):
        if entry.name.startswith(STAGING_PREFIX):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING_S:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
            except OSError:
                pass
