"""``appliance-trace --compare OLD NEW CAPTURE``: what a policy change would do to a capture.

Replays the capture under both policies (`appliance.whatif.CaptureComparison`) and prints
the rule-level diff (`appliance.ruleanalysis`) and every connection treated differently,
grouped by port and by the rule responsible on each side. ``--json``: one
``{"change": {...}}`` line per changed connection, then ``{"summary": {...}}``.

Exit status, like diff(1): 0 nothing in the capture would be treated differently, 1 something
would, 2 bad input (unreadable or invalid policy or capture, bad options).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any, Final

from appliance.capture import CaptureError, open_capture
from appliance.datapath.sim import SimNic
from appliance.model import Direction, Policy
from appliance.policy import ConfigError, load_policy
from appliance.replay import Assignment, Replayer
from appliance.ruleanalysis import diff_lines, diff_rules
from appliance.whatif import CaptureComparison, report_lines

EXIT_SAME: Final = 0
EXIT_CHANGED: Final = 1
EXIT_BAD_INPUT: Final = 2


def _error(message: str) -> None:
    print(f"appliance-trace: {message}", file=sys.stderr)


def _replayer(policy: Policy, args: argparse.Namespace) -> Replayer:
    return Replayer(
        policy,
        nic=SimNic(args.nic_capacity, args.nic_kinds, policy=args.nic_policy,
                   per_port=args.nic_port_quota),
        timeouts=args.timeouts, max_flows=args.max_flows,
        assignment=Assignment(args.port, Direction(args.direction) if args.direction else None))


def summary_text(s: dict[str, Any]) -> str:
    b, a = s["before"], s["after"]
    lines = [
        f"summary: {s['connections']} connections, {s['changed']} would change "
        f"({s['breaking']} breaking); {s['packets_changed']} of {s['packets']} packets, "
        f"{s['bytes_changed']} bytes treated differently",
        f"  before: forwarded {b['forwarded']}, dropped {b['dropped']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in b['drops'].items())})" if b["drops"] else ""),
        f"  after:  forwarded {a['forwarded']}, dropped {a['dropped']}"
        + (f" ({', '.join(f'{k} {v}' for k, v in a['drops'].items())})" if a["drops"] else ""),
    ]
    if s["other_changed"]:
        lines.append(f"  {s['other_changed']} of {s['other_packets']} packets outside "
                     "connections (ARP, ND, malformed) treated differently")
    return "\n".join(lines)


def run(args: argparse.Namespace, out: IO[str]) -> int:
    old_path, new_path, capture_path = args.compare
    policies = []
    for path in (old_path, new_path):
        try:
            policies.append(load_policy(path))
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_BAD_INPUT
    old, new = policies
    try:
        capture = open_capture(capture_path)
    except CaptureError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    try:
        comparison = CaptureComparison(_replayer(old, args), _replayer(new, args))
    except ValueError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    from appliance.cli.trace import _progress

    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    try:
        with capture, _progress(show_progress, capture.size) as tick:
            result = comparison.run(capture, args.count, tick)
    except CaptureError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    rules = diff_rules(old, new).as_dict()
    rows = [c.as_dict() for c in result.changes]
    summary = {**result.summary(), "old": old_path, "new": new_path, "capture": capture_path,
               "rules": rules, "capture_warnings": capture.warnings}
    if args.json:
        for row in rows:
            out.write(json.dumps({"change": row}) + "\n")
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        if not args.quiet:
            out.write(f"what-if: {old_path} -> {new_path} over {capture_path}\n")
            out.write("rule changes:\n" + "\n".join(diff_lines(rules)) + "\n")
            if rows:
                out.write("connections that would change, by port and responsible rule "
                          "(before -> after):\n")
                for line in report_lines(rows):
                    out.write(line + "\n")
        out.write(summary_text(summary) + "\n")
    for w in capture.warnings:
        _error(f"warning: {w}")
    return EXIT_CHANGED if rows or result.other_changed else EXIT_SAME


def main(args: argparse.Namespace) -> int:
    try:
        return run(args, sys.stdout)
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_SAME
    except OSError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
