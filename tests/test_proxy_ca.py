"""The proxy's CA is made once per configuration directory, however many proxies start at the same moment."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from rollouttap.errors import ConfigError, ProxyError
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
from rollouttap.manager.proxy_ca import ca_key_file, ensure_ca

# Each process waits for the go file, then does what a starting mitmdump does to its confdir (with or
# without ensure_ca first) and prints the fingerprint of the CA it would sign with.
STARTER = """
import os, sys, time
from mitmproxy.certs import CertStore
from rollouttap.manager.proxy_ca import ensure_ca
confdir, go, ensure = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
while not os.path.exists(go):
    time.sleep(0.001)
if ensure:
    ensure_ca(confdir)
print(CertStore.from_store(confdir, "mitmproxy", 2048).default_ca.fingerprint().hex())
"""


def _start_together(tmp_path, n: int, ensure: bool) -> tuple[set[str], str]:
    """The CAs ``n`` processes starting at once on a fresh confdir sign with, and the one agents trust."""
    from cryptography import x509
    from mitmproxy.certs import Cert

    confdir, go = tmp_path / f"conf-{ensure}", tmp_path / f"go-{ensure}"
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(confdir), str(go), "1" if ensure else "0"],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    time.sleep(1.0)  # every process imported and waiting (a late one only makes the race less likely)
    go.touch()
    signing = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    trusted = Cert(x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes()))
    return signing, trusted.fingerprint().hex()


def test_processes_starting_together_sign_with_the_ca_agents_trust(tmp_path):
    signing, trusted = _start_together(tmp_path, 4, ensure=True)
    assert signing == {trusted}


def test_a_ca_already_there_is_kept(tmp_path):
    assert ensure_ca(tmp_path) is True
    first = ca_key_file(tmp_path).read_bytes()
    assert ensure_ca(tmp_path) is False
    assert ca_key_file(tmp_path).read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ca-")]  # no staging left behind


def test_the_proxy_uses_the_confdir_given_in_extra(tmp_path):
    # --set confdir=... overrides ProxyConfig.confdir for mitmdump; the CA must be made where mitmdump looks.
    config = ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "unused", extra={"confdir": str(tmp_path / "c")})
    with ProxyProcess(config) as proxy:
        assert proxy.ca_cert == str(tmp_path / "c" / "mitmproxy-ca-cert.pem")
    assert ca_key_file(tmp_path / "c").exists() and not (tmp_path / "unused").exists()


def test_a_bad_key_size_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="key_size"):
        ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "c", extra={"key_size": "big"})).start()
    with pytest.raises(ProxyError, match="cannot make mitmproxy's CA"):
        ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "c", extra={"key_size": "64"})).start()
