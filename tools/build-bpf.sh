#!/usr/bin/env bash
# Build the kernel flow cache (cls_bpf programs) into appliance/datapath/bpf/flowcache.bpf.o.
# Called by tools/setup.sh; the object is a build product, not committed. Needs clang + libbpf-dev.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=appliance/datapath/bpf/flowcache.bpf.c
OUT=appliance/datapath/bpf/flowcache.bpf.o
# The uapi headers include <asm/types.h>, which lives in the multiarch directory (docs/KERNEL.md).
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
CLANG=${CLANG:-clang}

if [ "$OUT" -nt "$SRC" ] && [ "$OUT" -nt appliance/datapath/bpf/flowcache.h ] && [ "${1:-}" != "-f" ]; then
    echo "build-bpf: $OUT is up to date"
    exit 0
fi
# -mcpu=v3: the atomic OR that keeps TCP flags per connection (kernel >= 5.12; Debian 12 has 6.1)
"$CLANG" -O2 -g -Wall -Werror -target bpf -mcpu=v3 -I"/usr/include/$MULTIARCH" -c "$SRC" -o "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "build-bpf: built $OUT"
