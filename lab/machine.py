"""One lab host: a disk (overlay upper layer), a network namespace, and systemd as PID 1.

Every operation is idempotent and tolerates leftovers of a killed earlier lab: state is read
from the kernel (namespaces, links, cgroups), never trusted from a file.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from lab.paths import LabPaths
from lab.topology import BRIDGE, CONTROLLER_ADDRESS, SUBNET, LabHost, etc_hosts
from tasks.errors import BouwsteenError

BOOT_SCRIPT = Path(__file__).with_name("boot-host.sh")
# systemd's documented signal for "power off" (systemd(1), SIGRTMIN+4).
SIGPOWEROFF = signal.SIGRTMIN + 4


class LabError(BouwsteenError):
    pass


def run(argv: list[str], *, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def cgroup_root() -> Path:
    """The unified (cgroup2) hierarchy: /sys/fs/cgroup/unified on hybrid machines, else /sys/fs/cgroup."""
    for candidate in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.subtree_control").exists():
            return candidate
    raise LabError("no cgroup2 hierarchy mounted; the lab needs one to give each host systemd its own tree")


LAB_CGROUP = "bouwsteen-lab"


# ---------------------------------------------------------------- bridge

def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def ensure_bridge() -> None:
    if not bridge_exists():
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _sysctl_if(BRIDGE)
    addr = f"{CONTROLLER_ADDRESS}/{SUBNET.prefixlen}"
    current = run(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]).stdout
    if addr not in current:
        run(["ip", "addr", "replace", addr, "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])


def _sysctl_if(ifname: str) -> None:
    # Nothing is ever forwarded from the lab to the machine's other networks, and no IPv6.
    for key, value in (
        (f"/proc/sys/net/ipv4/conf/{ifname}/forwarding", "0"),
        (f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1"),
    ):
        try:
            Path(key).write_text(value)
        except OSError:
            pass


def delete_bridge() -> None:
    if bridge_exists():
        run(["ip", "link", "del", BRIDGE], check=False)


# ---------------------------------------------------------------- one host


class Machine:
    def __init__(self, host: LabHost, paths: LabPaths, image: Path | None = None):
        self.host = host
        self.paths = paths
        self.image = image
        self.dir = paths.host(host.name)

    # -- disk

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def ensure_disk(self, flows_key: str, tool_key: str) -> None:
        """Create the host's own layer once: identity, host key, the login keys.

        root takes the lab's tooling key everywhere, and the flows' key too unless the host has
        a non-root `ssh_user`: there only that user takes the flows' key (and uses sudo)."""
        marker = self.dir / "disk.ready"
        if marker.exists():
            return
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True)
        os.chmod(self.dir, 0o700)
        up = self.upper
        (up / "etc/ssh/sshd_config.d").mkdir(parents=True)
        (up / "root/.ssh").mkdir(parents=True, mode=0o700)
        (up / "etc/hostname").write_text(self.host.name + "\n")
        (up / "etc/hosts").write_text(etc_hosts())
        (up / "etc/machine-id").write_text(os.urandom(16).hex() + "\n")
        key = up / "etc/ssh/ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.host.name}", "-f", str(key)])
        (up / "etc/ssh/sshd_config.d/10-hostkey.conf").write_text("HostKey /etc/ssh/ssh_host_ed25519_key\n")
        root_keys = [tool_key] if self.host.ssh_user else [tool_key, flows_key]
        auth = up / "root/.ssh/authorized_keys"
        auth.write_text("".join(key.strip() + "\n" for key in root_keys))
        auth.chmod(0o600)
        (up / "root/.ssh").chmod(0o700)
        (up / "root").chmod(0o700)
        if self.host.ssh_user:
            self._authorize_login_user(self.host.ssh_user, flows_key)
        marker.write_text("ok\n")

    def _authorize_login_user(self, user: str, key: str) -> None:
        """The flows' key in the image's non-root user's authorized_keys, owned as sshd wants it."""
        if self.image is None:
            raise LabError(f"{self.host.name}: the image is needed to find user {user}")
        uid, gid, home = image_account(self.image, user)
        up = self.upper
        (up / "home").mkdir(exist_ok=True)
        (up / "home").chmod(0o755)
        ssh_dir = up / home.lstrip("/") / ".ssh"
        ssh_dir.mkdir(parents=True)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(key.strip() + "\n")
        for path, mode in ((ssh_dir.parent, 0o700), (ssh_dir, 0o700), (auth, 0o600)):
            os.chown(path, uid, gid)
            path.chmod(mode)

    def host_public_key(self) -> str:
        return " ".join((self.upper / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])

    def wipe_disk(self) -> None:
        if self.dir.exists():
            merged = str(self.dir / "merged")
            if merged in Path("/proc/self/mounts").read_text():
                run(["umount", "-l", merged], check=False)
            shutil.rmtree(self.dir)

    # -- network

    def netns_exists(self) -> bool:
        return Path(f"/run/netns/{self.host.netns}").exists()

    def ensure_network(self) -> None:
        """netns + veth + address; rebuilt from scratch if any piece is missing or wrong."""
        if self.netns_exists() and self._network_ok():
            return
        self.delete_network()
        ns = self.host.netns
        run(["ip", "netns", "add", ns])
        peer = f"bwp-{self.host.name}"[:15]
        run(["ip", "link", "add", self.host.veth, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        exec_ns = ["ip", "netns", "exec", ns]
        run(exec_ns + ["ip", "link", "set", peer, "name", "eth0"])
        run(exec_ns + ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
        run(exec_ns + ["ip", "addr", "add", f"{self.host.address}/{SUBNET.prefixlen}", "dev", "eth0"])
        run(exec_ns + ["ip", "link", "set", "lo", "up"])
        run(exec_ns + ["ip", "link", "set", "eth0", "up"])
        _sysctl_if(self.host.veth)
        run(["ip", "link", "set", self.host.veth, "master", BRIDGE])
        run(["ip", "link", "set", self.host.veth, "up"])

    def _network_ok(self) -> bool:
        if not Path(f"/sys/class/net/{self.host.veth}").exists():
            return False
        master = Path(f"/sys/class/net/{self.host.veth}/master")
        if not master.exists() or master.resolve().name != BRIDGE:
            return False
        inside = run(["ip", "netns", "exec", self.host.netns, "ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=False)
        return str(self.host.address) in inside.stdout

    def delete_network(self) -> None:
        if self.netns_exists():
            run(["ip", "netns", "del", self.host.netns], check=False)
        if Path(f"/sys/class/net/{self.host.veth}").exists():
            run(["ip", "link", "del", self.host.veth], check=False)

    def link_up(self, up: bool) -> None:
        if Path(f"/sys/class/net/{self.host.veth}").exists():
            run(["ip", "link", "set", self.host.veth, "up" if up else "down"])

    def is_isolated(self) -> bool:
        oper = Path(f"/sys/class/net/{self.host.veth}/flags")
        if not oper.exists():
            return False
        return not (int(oper.read_text(), 16) & 0x1)

    # -- cgroup and processes

    @property
    def cgroup(self) -> Path:
        return cgroup_root() / LAB_CGROUP / self.host.name

    def pids(self) -> list[int]:
        found: list[int] = []
        if not self.cgroup.exists():
            return found
        # os.walk ignores directories that vanish while we walk; systemd removes them as units stop.
        for dirpath, _dirs, _files in os.walk(self.cgroup):
            try:
                found += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
            except OSError:
                continue
        return found

    def init_pid(self) -> int | None:
        """The host's systemd: the process of our cgroup tree that is PID 1 in its own namespace."""
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                    return pid
        return None

    def is_running(self) -> bool:
        return self.init_pid() is not None

    def kill_all(self) -> None:
        """SIGKILL every process of the host (the cgroup holds them even if their launcher died)."""
        cg = self.cgroup
        if not cg.exists():
            return
        kill_file = cg / "cgroup.kill"
        if kill_file.exists():
            try:
                kill_file.write_text("1")
            except OSError:
                pass
        else:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.remove_cgroup()

    def remove_cgroup(self) -> None:
        cg = self.cgroup
        if not cg.exists():
            return
        # Depth first: a cgroup directory can only go once its children are gone.
        for dirpath, _dirs, _files in os.walk(cg, topdown=False):
            _rmdir_quiet(Path(dirpath))
        _rmdir_quiet(cg)

    # -- power

    def boot(self) -> None:
        if self.is_running():
            return
        if self.image is None:
            raise LabError("no image given; build it first")
        self.kill_all()
        merged = self.dir / "merged"
        merged.mkdir(exist_ok=True)
        # overlayfs refuses a work dir left dirty by an unclean stop.
        work = self.dir / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        self.cgroup.mkdir(parents=True, exist_ok=True)
        self.console_log.touch()
        argv = [
            "nsenter", f"--net=/run/netns/{self.host.netns}",
            "unshare", "-m", "-u", "-i", "-p", "-f", "-C", "--propagation", "private",
            "/bin/bash", str(BOOT_SCRIPT),
            str(self.image), str(self.upper), str(work), str(merged), str(self.console_log), self.host.name,
        ]
        procs_file = str(self.cgroup / "cgroup.procs")

        def enter_own_cgroup() -> None:
            with open(procs_file, "w") as fh:
                fh.write(str(os.getpid()))

        with open(self.console_log, "ab") as log:
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=enter_own_cgroup,
                close_fds=True,
            )
        deadline = time.monotonic() + 15
        while not self.is_running():
            if time.monotonic() > deadline:
                raise LabError(f"{self.host.name}: systemd did not start; see {self.console_log}")
            time.sleep(0.05)

    def poweroff(self, timeout: float = 30) -> None:
        pid = self.init_pid()
        if pid is not None:
            try:
                os.kill(pid, SIGPOWEROFF)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.is_running() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.kill_all()

    # -- readiness

    def wait_for_ssh(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((str(self.host.address), 22), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError(f"{self.host.name}: ssh did not answer within {timeout:.0f}s; see {self.console_log}")
            time.sleep(0.2)


def image_account(image: Path, user: str) -> tuple[int, int, str]:
    """(uid, gid, home) of `user` in the image's /etc/passwd."""
    for line in (image / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise LabError(f"the lab image has no user {user!r}; it is built by lab/image.py (`lab down`, then `lab up`)")


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT,):
            pass
