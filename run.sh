#!/usr/bin/env bash
# bouwsteen's two entry points on a fresh Debian 12 machine, as root:
#   ./run.sh demo   bring up the lab, a Prefect server and worker, and run every lifecycle flow
#   ./run.sh test   unit tests and the integration tests on the lab
# Each installs what it needs first (apt packages, the .venv) and is safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

# postgresql-15 on the controller only serves the test of a Prefect server on PostgreSQL; git and
# curl are used by TAB job sources and the tests; nginx with its njs module is the ticket proxy in
# front of the Prefect API (deployments/ticket_proxy.py).
APT_PACKAGES=(debootstrap iproute2 openssh-client util-linux procps psmisc python3 python3-venv python3-pip
              ca-certificates git curl postgresql-15 nginx-light libnginx-mod-http-js)

install_system() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    # The controller needs PostgreSQL's binaries, not a running default cluster on its port 5432.
    mkdir -p /etc/postgresql-common
    grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
      echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # bouwsteen runs its own nginx (its own file, loopback only): Debian's nginx service must not
    # start on port 80 while the package installs, nor at boot.
    local made_policy=""
    if [[ " ${missing[*]} " == *" nginx-light "* ]] && [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || exit "$rc"
    if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
      if [ -d /run/systemd/system ]; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
      else
        update-rc.d nginx disable >/dev/null 2>&1 || true
      fi
    fi
  fi
}

pick_python() {
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"; return
    fi
  done
  echo "no Python >= 3.11 found" >&2; exit 1
}

install_venv() {
  local stamp=.venv/.bouwsteen-installed
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[test,bench]'
    touch "$stamp"
  fi
}

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the lab needs namespaces, mounts and a bridge" >&2
  exit 1
fi

case "${1:-}" in
  demo)
    install_system
    install_venv
    exec .venv/bin/bouwsteen demo "${@:2}"
    ;;
  test)
    install_system
    install_venv
    exec .venv/bin/pytest -p no:cacheprovider "${@:2}"
    ;;
  *)
    echo "usage: $0 demo | test [pytest args]" >&2
    exit 2
    ;;
esac
