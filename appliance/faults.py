"""Fault isolation: an unexpected exception costs one packet (or one request), never the switch.

Frames from VMs are untrusted input and the code that handles them can have bugs. Wherever a
unit of work is handled -- one packet in the pipeline, one upcall, one operator request, one
netlink event, one sweep chunk -- an exception that escapes is caught at that boundary, turned
into a `Fault`, counted under the drop reason ``internal_error`` (per port for packets), and
the switch goes on. A `Fault` names its *cause* (exception type and the innermost frame of our
own code that raised it) so the daemon can log each distinct cause once, with the frame in hex,
and count repeats instead of flooding the log.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from appliance.outcomes import DropReason

INTERNAL_ERROR: Final = DropReason.INTERNAL_ERROR
_PACKAGE_DIR: Final = str(Path(__file__).resolve().parent)


@dataclass(frozen=True, slots=True)
class Fault:
    """One unexpected exception at a unit-of-work boundary."""

    where: str  # "process", "observe", "revalidate", "upcall", "ipc", "netlink", "sweep", ...
    ingress: str | None  # the port the packet came in on, when there was a packet
    cause: str  # "ValueError at appliance/packet.py:757 in _addr_bytes": stable across repeats
    message: str  # str(exception)
    traceback: str  # the formatted traceback, for logs and the trace tool's JSON note
    frame: bytes | None = None  # the packet being handled, when there was one


def cause_of(exc: BaseException) -> str:
    """Exception type + the innermost traceback entry inside appliance (else the innermost)."""
    entries = traceback.extract_tb(exc.__traceback__)
    ours = [e for e in entries if e.filename.startswith(_PACKAGE_DIR)]
    where = (ours or entries)[-1] if entries else None
    if where is None:
        return type(exc).__name__
    path = where.filename
    if path.startswith(_PACKAGE_DIR):
        path = "appliance" + path[len(_PACKAGE_DIR):]
    return f"{type(exc).__name__} at {path}:{where.lineno} in {where.name}"


def make_fault(where: str, exc: BaseException, *, ingress: str | None = None,
               frame: bytes | None = None) -> Fault:
    """Describe ``exc`` (caught at the ``where`` boundary) as a `Fault`."""
    text = "".join(traceback.format_exception(exc))
    return Fault(where, ingress, cause_of(exc), str(exc), text, frame)
