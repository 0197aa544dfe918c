"""Print the packages' copyright file: appliance itself and every distribution bundled in its
virtualenv, each with its license as its own metadata states it and where its license texts
are installed.

Read from the staged virtualenv's metadata, so the file lists exactly what ships.

    tools/gen_copyright.py --site STAGE/usr/lib/appliance/venv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path
from typing import Final

FORMAT: Final = "https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
COMMON_LICENSES: Final = Path("/usr/share/common-licenses")
STAGED_ROOT_MARK: Final = "/usr/lib/appliance/"  # the installed path starts here

APPLIANCE = """\
Files: *
Copyright: {years} the appliance developers
License: Apache-2.0
"""

APACHE = """\
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not use
 this software except in compliance with the License. Unless required by applicable
 law or agreed to in writing, software distributed under the License is distributed
 on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
 implied. See the License for the specific language governing permissions and
 limitations under the License.
 .
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
"""


def license_of(dist: metadata.Distribution) -> str:
    """The distribution's license: its SPDX expression, else its License field, else the
    trove classifiers' names."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 60:
        return text
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::")]
    return " OR ".join(classifiers) or _license_from_files(dist) or "UNKNOWN"


_LICENSE_HEADS = (("Apache License", "Version 2.0", "Apache-2.0"),
                  ("MIT License", "", "MIT"),
                  ("Permission is hereby granted, free of charge", "", "MIT"))


def _license_from_files(dist: metadata.Distribution) -> str | None:
    """Some wheels carry only the license text (no metadata field): recognise the common
    ones by their opening words."""
    for name in dist.files or []:
        if "LICENSE" not in name.name.upper() and "COPYING" not in name.name.upper():
            continue
        try:
            head = " ".join(Path(str(dist.locate_file(name))).read_text(errors="replace")
                            .split()[:40])
        except OSError:
            continue
        for first, second, spdx in _LICENSE_HEADS:
            if first in head and second in head:
                return spdx
    return None


def holders_of(dist: metadata.Distribution) -> str:
    """Who the distribution's metadata names as its authors."""
    meta = dist.metadata
    for field in ("Author", "Author-email", "Maintainer", "Maintainer-email"):
        value = (meta.get(field) or "").strip()
        if value:
            return " ".join(value.split())
    return f"the {meta['Name']} authors"


def installed_path(path: Path) -> str:
    """A staged path as it will be on the target system."""
    text = str(path)
    at = text.find(STAGED_ROOT_MARK)
    return text[at:] if at >= 0 else text


def license_files(dist: metadata.Distribution) -> list[str]:
    """Installed paths of the license texts inside the distribution's .dist-info."""
    out = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0].endswith(".dist-info") and (
                "licenses" in parts or Path(str(f)).name.upper().startswith(("LICEN", "COPYING"))):
            out.append(installed_path(Path(str(dist.locate_file(f)))))
    return sorted(out)


def paragraphs(site: Path) -> list[str]:
    """One Files paragraph per bundled distribution (appliance itself first)."""
    out = []
    dists = sorted(metadata.distributions(path=[str(site)]),
                   key=lambda d: d.metadata["Name"].lower())
    for dist in dists:
        name, version = dist.metadata["Name"], dist.version
        if name == "appliance":
            continue
        texts = license_files(dist)
        comment = f"Comment: {name} {version}, bundled in /usr/lib/appliance/venv."
        if texts:
            comment += "\n Full license text: " + "\n  ".join(texts)
        files = " ".join(f"{installed_path(site)}/{top}" for top in _top_levels(dist))
        out.append(f"Files: {files}\n"
                   f"Copyright: {holders_of(dist)}\n"
                   f"License: {license_of(dist)}\n{comment}\n")
    return out


def _top_levels(dist: metadata.Distribution) -> list[str]:
    """Globs for the distribution's files: its import package(s) and its dist-info."""
    tops = sorted({Path(str(f)).parts[0] for f in dist.files or []
                   if not str(f).startswith("..") and "/" in str(f)})
    return [f"{t}/*" for t in tops] or ["*"]


def render(site: Path, years: str) -> str:
    head = f"Format: {FORMAT}\nUpstream-Name: appliance\n"
    return "\n".join([head, APPLIANCE.format(years=years), *paragraphs(site), APACHE])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", type=Path, required=True, help="the venv's site-packages")
    p.add_argument("--years", required=True, help="years of appliance's copyright, 2025-2026")
    args = p.parse_args(argv)
    if not args.site.is_dir():
        p.error(f"{args.site}: not a directory")
    sys.stdout.write(render(args.site, args.years))
    return 0


if __name__ == "__main__":
    sys.exit(main())
