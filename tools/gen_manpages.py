"""Write the man pages of the four commands from their argparse definitions.

The options in a page are the parser's own, so a page cannot drift from ``--help``;
argparse-manpage turns a parser into roff, and ``packaging/man/PROG.include`` adds what a
parser does not know (more description, files, exit status, see also).

applianced and appliance-trace build their parser inside ``parse_args`` (which also parses);
rather than reshape those modules, `capture_parser` lets ``parse_args`` run until it asks the
parser to parse, and takes the parser there.

    tools/gen_manpages.py --version 0.1.0 --out build/man
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argparse_manpage.manpage import Manpage

ROOT = Path(__file__).resolve().parent.parent
INCLUDES = ROOT / "packaging" / "man"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(parse_args: Callable[[list[str]], Any]) -> argparse.ArgumentParser:
    """The parser ``parse_args`` builds, taken when it is asked to parse (nothing is parsed)."""
    original = argparse.ArgumentParser.parse_args

    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        parse_args([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{parse_args.__qualname__} returned without building a parser")


@dataclass(frozen=True)
class Page:
    prog: str
    section: int
    summary: str  # the NAME line: what whatis/apropos show
    parser: Callable[[], argparse.ArgumentParser]


def _appliancectl() -> argparse.ArgumentParser:
    from appliance.cli import appliancectl

    return appliancectl.build_parser()


def _applianced() -> argparse.ArgumentParser:
    from appliance.cli import applianced

    return capture_parser(applianced.parse_args)


def _trace() -> argparse.ArgumentParser:
    from appliance.cli import trace

    return capture_parser(trace.parse_args)


def _check_config() -> argparse.ArgumentParser:
    from appliance.cli import check_config

    return check_config._parser()


PAGES = (
    Page("appliancectl", 1, "operate a running applianced (shell and one-shot commands)",
         _appliancectl),
    Page("applianced", 8, "host virtual switch daemon with a kernel TC/BPF flow cache",
         _applianced),
    Page("appliance-trace", 1, "replay a pcap/pcapng capture through the switch pipeline",
         _trace),
    Page("appliance-check-config", 1, "validate appliance policy files", _check_config),
)


def render(page: Page, version: str, date: str) -> str:
    """One page as roff."""
    parser = page.parser()
    parser.prog = page.prog
    include = INCLUDES / f"{page.prog}.include"
    data: dict[str, Any] = {
        "prog": page.prog,
        "description": page.summary,
        "project_name": "appliance",
        "version": version,
        "date": date,
        "manual_section": str(page.section),
        "manual_title": "appliance manual",
    }
    if include.exists():
        data["include"] = str(include)
        if "[>DESCRIPTION]" in include.read_text():
            parser.description = None  # the include's description is the whole story
    return str(Manpage(parser, _data=data, format="pretty"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", required=True, help="package version shown in the footer")
    p.add_argument("--out", type=Path, required=True, help="directory for PROG.SECTION files")
    args = p.parse_args(argv)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = (datetime.datetime.fromtimestamp(epoch, datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    args.out.mkdir(parents=True, exist_ok=True)
    for page in PAGES:
        path = args.out / f"{page.prog}.{page.section}"
        path.write_text(render(page, args.version, when.strftime("%Y-%m-%d")))
        print(f"gen_manpages: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
