"""``python -m rollouttap.addon.make_ca DIR KEY_SIZE``: mitmproxy's CA files written into DIR.

A process of its own for manager/proxy_ca.py: mitmproxy writes the key under a process-wide umask of 0o77,
which a trainer's other threads must not share, and the manager imports nothing of mitmproxy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mitmproxy.certs import CertStore
from mitmproxy.options import CONF_BASENAME


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m rollouttap.addon.make_ca DIR KEY_SIZE", file=sys.stderr)
        return 2
    try:
        CertStore.create_store(Path(argv[0]), CONF_BASENAME, int(argv[1]))
    except (OSError, ValueError) as exc:  # ValueError: a key size the key generator refuses
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
