"""A store on a network filesystem is refused for writing: mountinfo parsing, classification, the refusal."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rollouttap.errors import StoreError
from rollouttap.store import Store, StoreWriter, connect, local_fs
from rollouttap.store.local_fs import ALLOW_ENV, Mount, check_local, is_network, mount_of, parse_mountinfo

# A cluster node: local root, tmpfs /tmp, NVMe scratch, NFS homes under autofs, Lustre and GPFS, a Windows
# share whose name has a space, a container's bind mount of a home folder.
CLUSTER_NODE = r"""
22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
27 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 27 0:27 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=16777216k,inode64
60 27 259:3 / /local/scratch rw,relatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,noquota
512 27 0:52 / /home rw,relatime shared:300 - autofs /etc/auto.home rw,fd=6,indirect
640 512 0:61 / /home/alice rw,relatime shared:320 - nfs4 nas01:/export/home/alice rw,vers=4.2,hard,addr=10.0.0.2
641 512 0:62 / /home/al rw,relatime shared:321 - nfs4 nas01:/export/home/al rw,vers=4.2,hard,proto=tcp
700 27 0:70 / /lustre/scratch rw,relatime shared:400 - lustre 10.0.0.5@o2ib:10.0.0.6@o2ib:/scratch rw,flock
701 27 0:71 / /lustre/scratch2 rw,relatime shared:401 - ext4 /dev/sdb1 rw
702 700 259:4 / /lustre/scratch/node-ssd rw,relatime shared:402 - ext4 /dev/nvme2n1 rw
710 27 0:72 / /gpfs/fs1 rw,relatime shared:410 - gpfs fs1 rw
720 27 0:73 / /mnt/team\040share rw,relatime shared:420 - cifs //fs01/team\040share rw,vers=3.1.1
730 27 0:74 / /data rw,relatime shared:430 - autofs /etc/auto.direct rw,fd=7,direct
731 730 0:75 / /data rw,relatime shared:431 - nfs4 nas02:/data rw,vers=4.1,hard
850 27 0:90 / /var/lib/docker/overlay2/x/merged rw,relatime - overlay overlay rw,lowerdir=/l/A
910 27 0:61 /export/home/alice/proj /workspace rw,relatime - nfs4 nas01:/export/home/alice rw,vers=4.2
"""

# Filesystems beside the common ones: what each kind of 9p and FUSE mount is taken for.
OTHER_MOUNTS = r"""
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
95 27 0:85 / /mnt/c rw,noatime - 9p drvfs rw,aname=drvfs;path=C:\134,trans=fd,rfd=5,wfd=5
96 27 0:86 / /mnt/diod rw,relatime - 9p 10.0.0.9 rw,access=user,trans=tcp,port=564
97 27 0:87 / /mnt/host rw,relatime - virtiofs hostshare rw
98 27 0:88 / /mnt/remote rw,nosuid,nodev,relatime - fuse.sshfs alice@login01:/data rw,user_id=1000,group_id=1000
99 27 0:89 / /mnt/lxc rw,nosuid,nodev,relatime - fuse.lxcfs lxcfs rw,user_id=0,group_id=0
100 27 0:91 / /mnt/beegfs rw,relatime - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/beegfs-client.conf
101 27 0:92 / /mnt/cephfs rw,relatime - ceph 10.0.0.1:6789:/ rw,name=admin,acl
102 27 0:93 / /mnt/cephfuse rw,nosuid,nodev,relatime - fuse.ceph-fuse ceph-fuse rw,user_id=0,group_id=0,allow_other
103 27 0:94 / /mnt/mystery rw,nosuid,nodev,relatime - fuse.somefs somefs rw,user_id=0,group_id=0
104 27 0:95 / /mnt/smb rw,relatime - smb3 //fs01/data rw,vers=3.1.1
"""


@pytest.mark.parametrize("path, point, fstype, network", [
    ("/home/alice/runs/runs.db", "/home/alice", "nfs4", True),  # NFS home under autofs: the NFS mount wins
    ("/home/alice", "/home/alice", "nfs4", True),
    ("/home/bob/runs.db", "/home", "autofs", False),  # not mounted (yet): autofs itself
    ("/home/alice2/runs.db", "/home", "autofs", False),  # "/home/al" is no prefix of "/home/alice2"
    ("/lustre/scratch/alice/runs.db", "/lustre/scratch", "lustre", True),
    ("/lustre/scratch/node-ssd/runs.db", "/lustre/scratch/node-ssd", "ext4", False),  # nested: longest wins
    ("/lustre/scratch2/runs.db", "/lustre/scratch2", "ext4", False),
    ("/gpfs/fs1/proj/runs.db", "/gpfs/fs1", "gpfs", True),
    ("/mnt/team share/runs.db", "/mnt/team share", "cifs", True),  # \040 in the mount point
    ("/mnt/team/runs.db", "/", "ext4", False),
    ("/data/runs.db", "/data", "nfs4", True),  # direct autofs map: the NFS mounted over it is the later line
    ("/workspace/runs.db", "/workspace", "nfs4", True),  # a bind mount keeps its origin's type
    ("/tmp/runs.db", "/tmp", "tmpfs", False),
    ("/local/scratch/alice/runs.db", "/local/scratch", "xfs", False),
    ("/var/lib/docker/overlay2/x/merged/runs.db", "/var/lib/docker/overlay2/x/merged", "overlay", False),
    ("/runs.db", "/", "ext4", False),
])
def test_mount_of_a_cluster_node_path(path, point, fstype, network):
    mount = mount_of(path, CLUSTER_NODE)
    assert mount is not None
    assert (mount.point, mount.fstype, is_network(mount)) == (point, fstype, network)


@pytest.mark.parametrize("path, fstype, network", [
    ("/mnt/c/Users/alice/runs.db", "9p", False),  # WSL2's Windows drive: the same machine
    ("/mnt/diod/runs.db", "9p", True),  # 9p over TCP to a server
    ("/mnt/host/runs.db", "virtiofs", False),
    ("/mnt/remote/runs.db", "fuse.sshfs", True),
    ("/mnt/lxc/runs.db", "fuse.lxcfs", False),
    ("/mnt/beegfs/runs.db", "beegfs", True),
    ("/mnt/cephfs/runs.db", "ceph", True),
    ("/mnt/cephfuse/runs.db", "fuse.ceph-fuse", True),
    ("/mnt/mystery/runs.db", "fuse.somefs", False),  # an unknown FUSE program is not guessed at
    ("/mnt/smb/runs.db", "smb3", True),
])
def test_network_classification(path, fstype, network):
    mount = mount_of(path, OTHER_MOUNTS)
    assert mount is not None and mount.fstype == fstype
    assert is_network(mount) is network


def test_mountinfo_escapes_are_decoded():
    text = r"5 1 0:9 / /mnt/a\040b\011c\134d\012e rw - nfs host:/a\040b rw,vers=3" + "\n"
    assert parse_mountinfo(text) == [Mount("/mnt/a b\tc\\d\ne", "nfs", "host:/a b", "rw,vers=3")]


def test_malformed_lines_are_skipped_and_nothing_matches_without_mounts():
    assert parse_mountinfo("garbage\n1 2 3\n\n27 1 254:0 / / rw - ext4\n") == []
    assert mount_of("/x/runs.db", "") is None


def test_optional_fields_do_not_shift_the_type():
    line = "640 512 0:61 / /home/alice rw shared:320 master:7 propagate_from:3 unbindable - nfs4 nas:/h rw\n"
    assert parse_mountinfo(line) == [Mount("/home/alice", "nfs4", "nas:/h", "rw")]


def test_this_machines_mountinfo_parses():
    if not local_fs.MOUNTINFO.exists():
        pytest.skip("no /proc/self/mountinfo (not Linux)")
    mount = mount_of(os.path.realpath("/"), local_fs.MOUNTINFO.read_text())
    assert mount is not None and mount.point == "/"


# -- the refusal, on real files: the test's tmp folder is made an NFS mount by a fixture mountinfo ---------


def _nfs_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    """Point the check at a mountinfo that has ``folder`` mounted over NFS; the folder (made) is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(folder)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
                         f"700 27 0:70 / {real} rw,relatime shared:9 - nfs4 nas01:/export/runs rw,vers=4.2\n")
    monkeypatch.setattr(local_fs, "MOUNTINFO", mountinfo)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    return folder


@pytest.mark.parametrize("opener", [connect, Store, StoreWriter])
def test_writable_open_on_nfs_is_refused(tmp_path, monkeypatch, opener):
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    path = folder / "sub" / "runs.db"
    with pytest.raises(StoreError) as caught:
        opener(path)
    message = str(caught.value)
    for part in (str(path), "nfs4", f"mounted at {os.path.realpath(folder)}", "local disk", f"{ALLOW_ENV}=1"):
        assert part in message
    assert not (folder / "sub").exists()  # refused before anything was made there


def test_a_symlink_into_nfs_is_followed(tmp_path, monkeypatch):
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    (tmp_path / "link").symlink_to(folder)
    real = re.escape(os.path.realpath(folder))
    with pytest.raises(StoreError, match=rf"store .*link/runs.db \(which is {real}/runs.db\)"):
        Store(tmp_path / "link" / "runs.db")


def test_a_symlinked_store_file_into_nfs_is_followed(tmp_path, monkeypatch):
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    local = tmp_path / "local"
    local.mkdir()
    (local / "runs.db").symlink_to(folder / "runs.db")  # dangling until created: SQLite would create it there
    with pytest.raises(StoreError, match="nfs4"):
        Store(local / "runs.db")


@pytest.mark.parametrize("value, allowed", [("1", True), ("0", False), ("", False)])
def test_the_environment_variable_allows_it(tmp_path, monkeypatch, value, allowed):
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / f"nfs-{value or 'empty'}")
    monkeypatch.setenv(ALLOW_ENV, value)
    if not allowed:
        with pytest.raises(StoreError, match="network filesystem"):
            Store(folder / "runs.db")
        return
    with Store(folder / "runs.db") as store:
        store.register_agent("a1")
        assert [a.agent_id for a in store.agents()] == ["a1"]


def test_readonly_open_on_nfs_is_not_refused(tmp_path, monkeypatch):
    with Store(tmp_path / "nfs" / "runs.db") as store:  # written while the folder counted as local
        store.register_agent("a1")
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    with Store(folder / "runs.db", readonly=True) as store:
        assert [a.agent_id for a in store.agents()] == ["a1"]
    with pytest.raises(StoreError, match="nfs4"):
        Store(folder / "runs.db")


def test_a_local_folder_beside_the_nfs_one_opens(tmp_path, monkeypatch):
    _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    with Store(tmp_path / "local" / "runs.db") as store:  # the root ext4 line of the fixture
        store.register_agent("a1")


def test_a_local_path_opens_with_this_machines_mounts(tmp_path):
    if local_fs.MOUNTINFO.exists():
        mount = mount_of(os.path.realpath(tmp_path), local_fs.MOUNTINFO.read_text())
        if mount is not None and is_network(mount):
            pytest.skip(f"the test's tmp folder is on {mount.fstype} here")
    with Store(tmp_path / "runs.db") as store:
        store.register_agent("a1")


def test_without_mountinfo_nothing_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(local_fs, "MOUNTINFO", tmp_path / "no-such-mountinfo")  # as on macOS
    check_local(tmp_path / "runs.db", environ={})
    with Store(tmp_path / "runs.db") as store:
        store.register_agent("a1")


def test_check_local_reads_the_given_environment(tmp_path, monkeypatch):
    folder = _nfs_at(tmp_path, monkeypatch, tmp_path / "nfs")
    check_local(folder / "runs.db", environ={ALLOW_ENV: "1"})
    with pytest.raises(StoreError):
        check_local(folder / "runs.db", environ={})
