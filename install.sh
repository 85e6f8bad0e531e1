#!/usr/bin/env bash
# Installs cloudtask and everything its tests need, from scratch, into ./.venv.
# Safe to run again. Needs python3 (>= 3.11) with venv; Debian packages are installed when root.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install.sh: cloudtask needs Python 3.11 or newer ($PY is $("$PY" -V 2>&1))" >&2
  exit 1
fi

# Debian packages the test suite uses: git (--worker-repo), openssh-server (a real sshd for the
# bootstrap tests; installing it starts no service here, the tests run their own on 127.0.0.1),
# systemd (systemd-analyze verifies the unit file), chromium (the status page in a real browser),
# passwd (useradd: a second local user tries the control socket), faketime (a clock jump on one
# agent process), iproute2 (network namespaces: an agent host whose link is taken down), debootstrap
# (a foreign host for the tests: a Debian root with its own older python3, see tests/fakes/foreign_host.py),
# postgresql (the PostgreSQL backend's tests start their own server from its initdb and postgres
# binaries on 127.0.0.1 and a free port; a cluster the package may start on 5432 is not used).
DEBS=(git openssh-server openssh-client systemd chromium passwd faketime iproute2 debootstrap postgresql)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "install.sh: please install these Debian packages: ${missing[*]}" >&2
  fi
fi

"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# The tests' foreign host (docs/testing.md): a Debian root with its own python3 3.9, built once and
# cached outside the checkout. Needs root (debootstrap, then mounts and namespaces in the tests).
if [[ $(id -u) -eq 0 ]]; then
  .venv/bin/python -m tests.fakes.foreign_host build ||
    echo "install.sh: warning: the foreign host root was not built; its tests will try again" >&2
fi
echo "installed: run the tests with  .venv/bin/pytest"
