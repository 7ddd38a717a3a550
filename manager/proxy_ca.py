"""mitmproxy's CA, made once per configuration directory however many proxies start at the same moment.

mitmdump makes its CA at start-up when ``confdir`` has none, and reads back the key file it just wrote. Proxies
that start together on a fresh directory (the ranks of a multi-GPU job, each starting its manager's proxy, or
``proxies=N`` of two managers) each make their own and overwrite each other's files: each proxy then signs with
its own CA while the agents trust the one whose certificate file was written last, and every HTTPS call of the
other proxies' agents fails verification. Making the CA here first leaves mitmdump nothing to make: one process
at a time (a lock), in a staging folder, published with a hard link that fails where a key already is, so
that nodes sharing the folder over NFS, which a lock does not reach across, keep the first key made.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
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
LOCK_FILE = ".rollouttap-ca.lock"
STAGING_PREFIX = ".rollouttap-ca-"
STALE_STAGING_S = 600.0  # a staging folder this old was left by a process that died making a CA
# flock errors of a filesystem that has no locks (NFSv3 without lockd, Lustre mounted noflock).
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def ca_key_file(confdir: str | Path) -> Path:
    """The file whose presence tells mitmdump that the CA exists (the key and certificate)."""
    return Path(os.path.expanduser(confdir)) / f"{BASENAME}-ca.pem"


def ensure_ca(confdir: str | Path = DEFAULT_CONFDIR, key_size: int = DEFAULT_KEY_SIZE,
              timeout: float = 60.0) -> bool:
    """Make mitmproxy's CA in ``confdir`` unless it is there; True when this call made it. Safe to call from
    many processes at once: one makes it, the others wait for it (up to ``timeout`` seconds) and make none.
    Raises ProxyError when the CA cannot be made, OSError when the folder cannot be written."""
    key_file = ca_key_file(confdir)
    if key_file.exists():
        return False
    directory = key_file.parent
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory, time.monotonic() + timeout):
        if key_file.exists():  # made while this process waited
            return False
        _remove_stale_staging(directory)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        try:
            _make_ca(staging, key_size)
            return _publish(staging, directory, key_file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _make_ca(staging: Path, key_size: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "rollouttap.addon.make_ca", str(staging), str(key_size)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ProxyError(f"cannot make mitmproxy's CA in {staging.parent}: {reason}")


def _publish(staging: Path, directory: Path, key_name: str) -> bool:
    """Move the staged CA in, the key first; False (and nothing moved) when a key got there first."""
    try:
        os.link(staging / key_name, directory / key_name)  # whole or not at all, and never over another
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: the lock alone keeps this host's processes apart
        os.replace(staging / key_name, directory / key_name)
    for name in os.listdir(staging):
        if name != key_name:
            os.replace(staging / name, directory / name)
    return True


@contextmanager
def _locked(directory: Path, deadline: float) -> Iterator[None]:
    """Held by one process at a time: a lock file in ``directory``, or, where that filesystem has no locks,
    one in this host's temp folder named after it."""
    handle = open(directory / LOCK_FILE, "a")
    try:
        try:
            _flock(handle, deadline, directory)
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            handle.close()
            name = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:16]
            handle = open(Path(tempfile.gettempdir()) / f"rollouttap-ca-{os.getuid()}-{name}.lock", "a")
            _flock(handle, deadline, directory)
        yield
    finally:
        handle.close()  # releases the lock, as the process's end would


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
    """Staging folders (each with a private key) of processes that died making a CA."""
    now = time.time()
    for entry in os.scandir(directory):
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
