#!/bin/bash
# PID 1 of a lab host's new namespaces, before it becomes systemd.
# Builds the host's root: overlayfs over the shared image, its own proc/sys/cgroup, a tiny /dev.
# The machine's /sys and /dev are never bound in: a host systemd that sees the machine's cgroup
# hierarchies moves services out of the sandbox's groups, and the machine's /dev holds its disk.
set -euo pipefail
lower=$1 upper=$2 work=$3 merged=$4 console=$5 name=$6

mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged"

mount -t proc proc "$merged/proc"
mount --bind "$merged/proc/sys" "$merged/proc/sys"
mount -o remount,bind,ro "$merged/proc/sys"
mount --bind "$merged/proc/sys/net" "$merged/proc/sys/net"
if [ -e "$merged/proc/sysrq-trigger" ]; then
  mount --bind "$merged/proc/sysrq-trigger" "$merged/proc/sysrq-trigger"
  mount -o remount,bind,ro "$merged/proc/sysrq-trigger"
fi

mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$merged/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$merged/sys/fs/cgroup"

mount -t tmpfs -o mode=755,nosuid,size=65536k tmpfs "$merged/dev"
for node in null zero full random urandom tty; do
  touch "$merged/dev/$node"
  mount --bind "/dev/$node" "$merged/dev/$node"
done
mkdir -p "$merged/dev/pts" "$merged/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$merged/dev/pts"
ln -s pts/ptmx "$merged/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$merged/dev/shm"
ln -s /proc/self/fd "$merged/dev/fd"
ln -s /proc/self/fd/0 "$merged/dev/stdin"
ln -s /proc/self/fd/1 "$merged/dev/stdout"
ln -s /proc/self/fd/2 "$merged/dev/stderr"
touch "$merged/dev/console"
mount --bind "$console" "$merged/dev/console"

mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$merged/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$merged/tmp"

hostname "$name"

exec env -i container=bouwsteen-lab PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  setpriv --bounding-set -sys_module,-sys_time \
  chroot "$merged" /lib/systemd/systemd --system --log-target=console </dev/null >>"$console" 2>&1
