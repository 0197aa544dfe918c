"""Print the Debian changelog of the package (native format: one entry for this version).

dpkg and lintian want /usr/share/doc/appliance/changelog.gz in Debian's format; the project's
own history (CHANGELOG.md) ships beside it and the entry points there.

    tools/gen_debchangelog.py --version 0.1.0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Final

MAINTAINER: Final = "appliance maintainers <maintainers@appliance.example.org>"


def render(version: str, when: float) -> str:
    """One changelog entry for ``version`` dated ``when`` (seconds since the epoch)."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when))
    return (f"appliance ({version}) unstable; urgency=medium\n\n"
            f"  * appliance {version}. The changes are listed in\n"
            f"    /usr/share/doc/appliance/CHANGELOG.md.gz.\n\n"
            f" -- {MAINTAINER}  {date}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", required=True)
    args = p.parse_args(argv)
    when = float(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    sys.stdout.write(render(args.version, when))
    return 0


if __name__ == "__main__":
    sys.exit(main())
