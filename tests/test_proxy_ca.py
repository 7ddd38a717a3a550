"""The proxy's CA is made once per configuration directory, however many proxies start at the same moment."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

from rollouttap.errors import ConfigError, ProxyError
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
from rollouttap.manager.proxy_ca import STAGING_PREFIX, _publish, ca_key_file, ensure_ca

# Each process says it is ready, waits for a line on stdin, then does what a starting proxy does to its
# confdir (ensure_ca, then mitmproxy's own start-up) and prints the fingerprint of the CA it signs with.
STARTER = """
import sys
from mitmproxy.certs import CertStore
from rollouttap.manager.proxy_ca import ensure_ca
print("READY", flush=True)
sys.stdin.readline()
ensure_ca(sys.argv[1])
print(CertStore.from_store(sys.argv[1], "mitmproxy", 2048).default_ca.fingerprint().hex(), flush=True)
"""


def test_processes_starting_together_sign_with_the_ca_agents_trust(tmp_path):
    from cryptography import x509
    from mitmproxy.certs import Cert

    confdir = tmp_path / "conf"
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(confdir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        assert proc.stdout.readline() == "READY\n"
    for proc in procs:  # released together (without ensure_ca, mitmproxy makes one CA per process here)
        proc.stdin.write("go\n")
        proc.stdin.flush()
    signing = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    trusted = Cert(x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes()))
    assert signing == {trusted.fingerprint().hex()}


def test_a_key_made_elsewhere_meanwhile_wins(tmp_path):
    # Another node sharing the folder made a key the lock did not keep out: nothing of ours replaces it.
    staging, directory = tmp_path / "staging", tmp_path / "conf"
    staging.mkdir()
    directory.mkdir()
    for name, text in (("mitmproxy-ca.pem", "ours"), ("mitmproxy-ca-cert.pem", "ours")):
        (staging / name).write_text(text)
    (directory / "mitmproxy-ca.pem").write_text("theirs")
    (directory / "mitmproxy-ca-cert.pem").write_text("theirs")
    assert _publish(staging, directory, "mitmproxy-ca.pem") is False
    assert {p.read_text() for p in directory.iterdir()} == {"theirs"}


def test_a_folder_without_locks_is_locked_on_this_host(tmp_path, monkeypatch):
    # NFS without lockd refuses flock (ENOLCK): the CA is still made, under a lock in the temp folder.
    real_flock, locked = fcntl.flock, []

    def flock(handle, operation):
        if handle.name.startswith(str(tmp_path / "conf")):
            raise OSError(errno.ENOLCK, "No locks available")
        locked.append(handle.name)
        return real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    assert ensure_ca(tmp_path / "conf", local_locks=tmp_path / "locks") is True
    assert ca_key_file(tmp_path / "conf").exists()
    assert len(locked) == 1 and locked[0].startswith(str(tmp_path / "locks"))
    assert (tmp_path / "locks").stat().st_mode & 0o777 == 0o700


def test_staging_left_by_a_dead_process_is_removed(tmp_path):
    conf = tmp_path / "conf"
    old, fresh = conf / (STAGING_PREFIX + "old"), conf / (STAGING_PREFIX + "fresh")
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "mitmproxy-ca.pem").write_text("a private key")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    ensure_ca(conf)
    assert not old.exists() and fresh.exists()  # a fresh one may be another process's, making a CA now


def test_a_ca_already_there_is_kept(tmp_path):
    assert ensure_ca(tmp_path) is True
    first = ca_key_file(tmp_path).read_bytes()
    assert ensure_ca(tmp_path) is False
    assert ca_key_file(tmp_path).read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rollouttap-ca-")]  # no staging left behind


def test_the_proxy_uses_the_confdir_given_in_extra(tmp_path):
    # --set confdir=... overrides ProxyConfig.confdir for mitmdump; the CA must be made where mitmdump looks.
    config = ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "unused", extra={"confdir": str(tmp_path / "c")})
    with ProxyProcess(config) as proxy:
        assert proxy.ca_cert == str(tmp_path / "c" / "mitmproxy-ca-cert.pem")
    assert ca_key_file(tmp_path / "c").exists() and not (tmp_path / "unused").exists()


def test_a_bad_key_size_is_a_clear_error(tmp_path):
    for bad in ("big", "²"):  # "²".isdigit(), but no int
        with pytest.raises(ConfigError, match="key_size"):
            ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "c", extra={"key_size": bad})
    proxy = ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "c", extra={"key_size": "64"}))
    with pytest.raises(ProxyError, match="cannot make mitmproxy's CA in .*: key_size must be at least"):
        proxy.start()
    assert not proxy.log_path.exists()  # nothing started: no log left behind
    assert not ca_key_file(tmp_path / "c").exists()


def test_a_key_without_its_certificate_gets_it_back(tmp_path):
    # A maker killed between publishing the key and its certificate: the certificate is written from the key.
    conf = tmp_path / "conf"
    ensure_ca(conf)
    cert = (conf / "mitmproxy-ca-cert.pem").read_bytes()
    (conf / "mitmproxy-ca-cert.pem").unlink()
    assert ensure_ca(conf) is False  # no new CA: the key stays
    assert (conf / "mitmproxy-ca-cert.pem").read_bytes() == cert


def test_a_link_that_says_exists_but_made_ours_publishes(tmp_path, monkeypatch):
    # NFS may answer a retried link EEXIST although its first attempt made the link.
    staging, directory = tmp_path / "staging", tmp_path / "conf"
    staging.mkdir()
    directory.mkdir()
    (staging / "mitmproxy-ca.pem").write_text("ours")
    (staging / "mitmproxy-ca-cert.pem").write_text("ours")
    real_link = os.link

    def link_twice(src, dst):
        real_link(src, dst)
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(os, "link", link_twice)
    assert _publish(staging, directory, "mitmproxy-ca.pem") is True
    assert (directory / "mitmproxy-ca-cert.pem").read_text() == "ours"
