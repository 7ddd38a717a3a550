"""mitmproxy's CA, made once per configuration directory however many proxies start at the same moment.

mitmdump makes its CA at start-up when ``confdir`` has none, and reads back the key file it just wrote. Proxies
that start together on a fresh directory (the ranks of a multi-GPU job, each starting its manager's proxy, or
``proxies=N`` of two managers) each make their own and overwrite each other's files: each proxy then signs with
its own CA while the agents trust the one whose certificate file was written last, and every HTTPS call of the
other proxies' agents fails verification. Making the CA here first, under a lock and with a rename that shows
the files all at once, leaves mitmdump nothing to make.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

# mitmproxy.options' CONF_DIR, CONF_BASENAME and KEY_SIZE, written out so the manager need not import
# mitmproxy (a tenth of a second) to find the directory.
DEFAULT_CONFDIR = "~/.mitmproxy"
BASENAME = "mitmproxy"
DEFAULT_KEY_SIZE = 2048
LOCK_FILE = ".rollouttap-ca.lock"


def ca_key_file(confdir: str | Path) -> Path:
    """The file whose presence tells mitmdump that the CA exists (the key and certificate)."""
    return Path(os.path.expanduser(confdir)) / f"{BASENAME}-ca.pem"


def ensure_ca(confdir: str | Path = DEFAULT_CONFDIR, key_size: int = DEFAULT_KEY_SIZE) -> bool:
    """Make mitmproxy's CA in ``confdir`` unless it is there; True when this call made it. Safe to call from
    many processes at once: one makes it, the others wait for it and make none."""
    key_file = ca_key_file(confdir)
    if key_file.exists():
        return False
    directory = key_file.parent
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if key_file.exists():  # made while this process waited
            return False
        from mitmproxy.certs import CertStore

        staging = Path(tempfile.mkdtemp(prefix=".ca-", dir=directory))
        try:
            CertStore.create_store(staging, BASENAME, key_size)
            # The key file last: a mitmdump started by hand meanwhile sees either no CA or the whole of it.
            names = sorted(os.listdir(staging), key=lambda name: name == key_file.name)
            for name in names:
                os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True
