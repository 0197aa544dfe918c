#!/usr/bin/env bash
# Acceptance test of the packages (a step of tools/test.sh after pytest; needs root).
#
#  1. tools/package.sh builds both packages (dist/); lintian must report no error; rpm -qlp,
#     --requires and --configfiles must show what the .rpm is meant to hold.
#  2. A throwaway Debian 12 root (mmdebstrap: minbase + man-db + systemd, not booted; from the
#     mirror apt uses here).
#     In it: apt-get install ./appliance_*.deb, then the installed applianced --check,
#     appliancectl --help, appliance-trace on the example capture (same summary as the
#     checkout's), man appliancectl, the bash completion, the groups, the shipped BPF object
#     loaded into the kernel through the installed libbpf1; systemd-analyze verify on the unit.
#  3. Upgrade to a rebuilt package with a bumped version whose default conffiles changed: the
#     conffile the admin edited is kept (the new one lands beside it as .dpkg-dist), the
#     untouched one is updated. systemd is installed but not running there, so a stand-in
#     systemctl (the real one diverted aside) records
#     what the maintainer scripts ask of it: on upgrade, restart with <state_dir>/stop-headless
#     present (a headless stop); on remove, a stop without it.
#  4. remove (conffiles stay), purge (nothing of appliance is left: files, conffiles, groups,
#     pinned maps, runtime directory), autoremove; the root's file list must then be what it
#     was before the install, apart from the package manager's own records.
#
# PKG_TEST_KEEP=1 keeps the work directory for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

if [ "$(id -u)" -ne 0 ]; then
    echo "test-packages: needs root (mmdebstrap, chroot)" >&2
    exit 1
fi
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/appliance-pkgtest.XXXXXX")
ROOTFS=$WORK/root
cleanup() {
    mountpoint -q "$ROOTFS/proc" 2>/dev/null && umount -l "$ROOTFS/proc"
    if [ -z "${PKG_TEST_KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

step() { echo "== test-packages: $* ($(( $(date +%s) - START )) s)"; }
fail() { echo "test-packages: FAILED: $*" >&2; exit 1; }
in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }
expect_in() { grep -qF -- "$1" <<<"$2" || fail "$3: '$1' not in: $2"; }

VERSION=$(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
NEXT=$VERSION.1
ARCH=$(dpkg --print-architecture)

# ---------------------------------------------------------------- 1. build, lintian, rpm
step "build $VERSION"
tools/package.sh
DEB=dist/appliance_${VERSION}_${ARCH}.deb
RPM=$(ls dist/appliance-"$VERSION".*.rpm)
step "build $NEXT (changed default conffiles)"
PKG_OUT=$WORK/next APPLIANCE_VERSION=$NEXT PKG_CONF_NOTE="changed upstream in $NEXT" \
    tools/package.sh >/dev/null
DEB_NEXT=$WORK/next/appliance_${NEXT}_${ARCH}.deb

step "lintian"
lintian --fail-on error "$DEB" || fail "lintian reported errors"

step "rpm queries"
listing=$(rpm -qlp "$RPM" 2>/dev/null)
for path in /usr/bin/applianced /usr/bin/appliancectl /usr/bin/appliance-trace \
    /usr/bin/appliance-check-config /etc/appliance/appliance.toml /etc/appliance/policy.yaml \
    /usr/lib/systemd/system/applianced.service /usr/share/man/man1/appliancectl.1.gz \
    /usr/share/man/man8/applianced.8.gz /usr/share/bash-completion/completions/appliancectl \
    /usr/share/doc/appliance/copyright /usr/lib/appliance/venv/bin/python3.11 \
    /usr/lib/appliance/venv/lib/python3.11/site-packages/appliance/datapath/bpf/flowcache.bpf.o; do
    grep -qx -- "$path" <<<"$listing" || fail "rpm -qlp: $path missing"
done
requires=$(rpm -qp --requires "$RPM" 2>/dev/null)
echo "$requires" | sed 's/^/  requires: /'
for dep in python3.11 "libbpf >= 1.1" iproute iproute-tc shadow-utils /usr/bin/kill; do
    grep -qx -- "$dep" <<<"$requires" || fail "rpm --requires: $dep missing"
done
configs=$(rpm -qp --configfiles "$RPM" 2>/dev/null)
[ "$(sort <<<"$configs" | tr '\n' ' ')" = "/etc/appliance/appliance.toml /etc/appliance/policy.yaml " ] \
    || fail "rpm --configfiles: $configs"

# ---------------------------------------------------------------- 2. install in a clean root
step "mmdebstrap (minbase + man-db + systemd)"
SOURCES=/etc/apt/sources.list.d/debian.sources
[ -f "$SOURCES" ] || SOURCES=http://deb.debian.org/debian
# systemd: what a host running the service has, and what systemd-analyze verify checks against
mmdebstrap --quiet --variant=minbase --include=man-db,systemd --skip=cleanup/apt/lists \
    bookworm "$ROOTFS" "$SOURCES"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"
mkdir -p "$ROOTFS/sys/fs/bpf"  # where the purge looks for pinned maps (a plain directory here)
# What the root holds before the package comes: compared with what is left after the purge.
# Not compared: the package manager's records and caches, logs, and /run (a tmpfs on a real
# host; systemd-analyze leaves a marker there). /run/appliance is checked by name below.
snapshot() {
    (cd "$ROOTFS" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./run -o -path ./var/lib/apt \
        -o -path ./var/cache -o -path ./var/log -o -path ./var/lib/dpkg \) -prune -o -print \
        | sort)
}
snapshot >"$WORK/before.txt"

step "apt-get install ./$(basename "$DEB")"
cp "$DEB" "$DEB_NEXT" "$ROOTFS/tmp/"
# --no-install-recommends: the root stays minimal, and autoremove can take back all it brought
# (apt itself recommends ca-certificates, which python3.11 recommends too, so it would stay)
in_root apt-get install -y -q --no-install-recommends "/tmp/$(basename "$DEB")" >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log"; fail "apt-get install"; }
in_root dpkg-query -W -f='${Status} ${Version}\n' appliance | grep -qx "install ok installed $VERSION" \
    || fail "not installed"

step "installed commands"
out=$(in_root applianced --check) || fail "applianced --check: $out"
expect_in "/etc/appliance/policy.yaml: ok" "$out" "applianced --check"
out=$(in_root appliancectl --help) || fail "appliancectl --help"
expect_in "Operate a running applianced" "$out" "appliancectl --help"
out=$(in_root appliance-trace /usr/share/doc/appliance/examples/policy.yaml \
    /usr/share/doc/appliance/examples/demo.pcap -q) || fail "appliance-trace: $out"
# the installed tool tells the same story as the checkout's
expected=$(.venv/bin/appliance-trace config/examples/policy.yaml config/examples/demo.pcap -q)
[ "$out" = "$expected" ] || fail "appliance-trace summary differs: $out"
expect_in "summary:" "$out" "appliance-trace"
out=$(in_root appliance-check-config /etc/appliance/policy.yaml) || fail "check-config: $out"
# the shipped BPF object passes the kernel's verifier through Debian's libbpf1 (the package's
# dependency), loaded the way the daemon loads it
out=$(in_root /usr/lib/appliance/venv/bin/python -c '
from appliance.datapath.libbpf import BpfObject
from appliance.datapath.tc import BPF_OBJECT
BpfObject(BPF_OBJECT).close()
print("loaded", BPF_OBJECT)' 2>&1) || fail "BPF object does not load: $out"
expect_in "loaded /usr/lib/appliance/venv/" "$out" "BPF object"
out=$(in_root env MANPAGER=cat MANWIDTH=100 man appliancectl 2>&1 | tr -s ' ') \
    || fail "man appliancectl: $out"
expect_in "appliancectl - operate a running applianced" "$out" "man appliancectl"
expect_in "EXIT STATUS" "$out" "man appliancectl"
out=$(in_root env MANPAGER=cat man 8 applianced 2>&1) || fail "man 8 applianced: $out"
expect_in "stop-headless" "$out" "man 8 applianced"
out=$(in_root bash -c 'source /usr/share/bash-completion/completions/appliancectl
    COMP_WORDS=(appliancectl rule add acl ""); COMP_CWORD=4; _appliancectl; echo "${COMPREPLY[*]}"
    COMP_WORDS=(appliancectl -j fl); COMP_CWORD=2; _appliancectl; echo "${COMPREPLY[*]}"')
[ "$out" = $'in out\nflows flush' ] || fail "bash completion: $out"
in_root getent group appliance >/dev/null || fail "group appliance missing"
in_root getent group appliance-ro >/dev/null || fail "group appliance-ro missing"
pyc=$(find "$ROOTFS/usr/lib/appliance/venv" -name '*.pyc' | wc -l)
[ "$pyc" -gt 100 ] || fail "the postinst compiled $pyc modules"

step "systemd-analyze verify"
out=$(in_root systemd-analyze verify applianced.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify complained: $out"

# ---------------------------------------------------------------- 3. upgrade
step "upgrade to $NEXT with a stand-in systemctl"
echo "# edited by the admin" >>"$ROOTFS/etc/appliance/appliance.toml"
mkdir -p "$ROOTFS/run/systemd/system" "$ROOTFS/run/appliance"
# the real systemctl is diverted aside while the stand-in takes its place
in_root dpkg-divert --quiet --local --rename --divert /usr/bin/systemctl.real --add /usr/bin/systemctl
cat >"$ROOTFS/usr/bin/systemctl" <<'EOF'
#!/bin/sh
# Stand-in for systemctl in a root without systemd: records each call, and whether the
# stop-headless file existed when the unit was restarted or stopped; applianced "is active".
state=absent
[ -e /run/appliance/stop-headless ] && state=present
echo "$* stop-headless=$state" >>/var/log/systemctl-stand-in.log
case "$1" in
    is-active | --quiet) exit 0 ;;
    restart | stop) rm -f /run/appliance/stop-headless ;;
esac
exit 0
EOF
chmod 755 "$ROOTFS/usr/bin/systemctl"
in_root apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
    "/tmp/$(basename "$DEB_NEXT")" \
    >"$WORK/upgrade.log" 2>&1 || { cat "$WORK/upgrade.log"; fail "upgrade"; }
in_root dpkg-query -W -f='${Version}' appliance | grep -qx "$NEXT" || fail "version after upgrade"
calls=$(cat "$ROOTFS/var/log/systemctl-stand-in.log")
echo "$calls" | sed 's/^/  systemctl /'
expect_in "restart applianced.service stop-headless=present" "$calls" "headless restart"
[ ! -e "$ROOTFS/run/appliance/stop-headless" ] || fail "stop-headless left behind"
conf=$(cat "$ROOTFS/etc/appliance/appliance.toml")
expect_in "# edited by the admin" "$conf" "admin's appliance.toml kept"
grep -q "changed upstream" "$ROOTFS/etc/appliance/appliance.toml" && fail "admin's conffile replaced"
grep -q "changed upstream in $NEXT" "$ROOTFS/etc/appliance/appliance.toml.dpkg-dist" \
    || fail "new appliance.toml not put beside the admin's"
grep -q "changed upstream in $NEXT" "$ROOTFS/etc/appliance/policy.yaml" \
    || fail "untouched policy.yaml not updated"
out=$(in_root applianced --check) || fail "applianced --check after upgrade: $out"

# ---------------------------------------------------------------- 4. remove, purge
step "remove"
: >"$ROOTFS/var/log/systemctl-stand-in.log"
in_root apt-get remove -y -q appliance >"$WORK/remove.log" 2>&1 \
    || { cat "$WORK/remove.log"; fail "remove"; }
calls=$(cat "$ROOTFS/var/log/systemctl-stand-in.log")
expect_in "stop applianced.service stop-headless=absent" "$calls" "full stop on remove"
in_root dpkg-query -W -f='${Status}' appliance | grep -qx "deinstall ok config-files" \
    || fail "status after remove"
[ ! -e "$ROOTFS/usr/lib/appliance" ] || fail "/usr/lib/appliance left after remove: \
$(find "$ROOTFS/usr/lib/appliance" | head)"
[ -f "$ROOTFS/etc/appliance/appliance.toml" ] || fail "conffiles gone on remove"

step "purge"
mkdir -p "$ROOTFS/sys/fs/bpf/appliance" && touch "$ROOTFS/sys/fs/bpf/appliance/flows"
in_root apt-get purge -y -q appliance >"$WORK/purge.log" 2>&1 \
    || { cat "$WORK/purge.log"; fail "purge"; }
rm -f "$ROOTFS/usr/bin/systemctl" "$ROOTFS/var/log/systemctl-stand-in.log"
in_root dpkg-divert --quiet --local --rename --remove /usr/bin/systemctl
rmdir "$ROOTFS/run/systemd/system" "$ROOTFS/run/systemd" 2>/dev/null || true
in_root apt-get autoremove --purge -y -q >"$WORK/autoremove.log" 2>&1 \
    || { cat "$WORK/autoremove.log"; fail "autoremove"; }
in_root dpkg-query -W appliance >/dev/null 2>&1 && fail "still known to dpkg after purge"
in_root getent group appliance >/dev/null && fail "group appliance left"
in_root getent group appliance-ro >/dev/null && fail "group appliance-ro left"
# /var/cache is not looked at: man-db keeps formatted copies of the pages `man` showed above
# (/var/cache/man/cat*), which its daily job expires.
left=$(cd "$ROOTFS" && find . -xdev \( -path ./proc -o -path ./tmp -o -path ./var/cache \) -prune \
    -o -iname '*appliance*' -print)
[ -z "$left" ] || fail "left after purge: $left"
snapshot >"$WORK/after.txt"
if ! diff -u "$WORK/before.txt" "$WORK/after.txt" >"$WORK/root.diff"; then
    cat "$WORK/root.diff"
    fail "the root differs from before the install"
fi

step "ok: built, linted, installed, upgraded, removed and purged"
echo "test-packages: $(( $(date +%s) - START )) s"
