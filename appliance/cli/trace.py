"""appliance-trace: replay a pcap/pcapng capture through the switch pipeline offline.

Shows, per packet, where it was resolved (NIC cache, host flow table, slow path), each layer's
rule and action on the slow path (like ``ovs-appctl ofproto/trace``), the compiled actions and
the packet as it leaves; then a summary. ``--json`` prints one JSON object per packet and a
final ``{"summary": ...}`` line. ``--write`` saves the packets as they leave.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import IO, Any

from appliance import packet as pk
from appliance.capture import CaptureError, PcapWriter, open_capture
from appliance.datapath.cachepolicy import POLICIES
from appliance.datapath.sim import DEFAULT_CAPACITY, DEFAULT_POLICY, SimNic
from appliance.faults import INTERNAL_ERROR
from appliance.keyfmt import key_dict, key_text
from appliance.model import ActionKind, Direction
from appliance.pipeline import Result
from appliance.policy import ConfigError, load_policy
from appliance.replay import Assignment, Replayer
from appliance.timeouts import Timeouts
from appliance.translate import describe_action

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="appliance-trace",
        description="Replay a capture through the appliance pipeline with a simulated NIC.",
    )
    p.add_argument("policy", nargs="?", help="policy file (YAML)")
    p.add_argument("capture", nargs="?", help="pcap or pcapng file")
    p.add_argument("--compare", nargs=3, metavar=("OLD", "NEW", "CAPTURE"),
                   help="what-if: replay CAPTURE under both policies, report the connections "
                        "treated differently (exit 0 none, 1 some, 2 bad input)")
    p.add_argument("--port", help="treat every packet as coming from/for this port")
    p.add_argument("--direction", choices=["in", "out"],
                   help="force the direction: out = sent by the port, in = from the uplink")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per packet")
    out.add_argument("-q", "--quiet", action="store_true", help="summary only")
    p.add_argument("--write", metavar="OUT.pcap", help="write the packets as they leave")
    p.add_argument("--nic-capacity", type=int, default=DEFAULT_CAPACITY, metavar="N",
                   help=f"simulated NIC flow-cache entries (default {DEFAULT_CAPACITY})")
    p.add_argument("--nic-actions", metavar="KINDS",
                   help="action kinds the NIC can execute, comma-separated "
                        f"(default all: {','.join(k.value for k in ActionKind)})")
    p.add_argument("--nic-policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help=f"NIC cache replacement/admission policy (default {DEFAULT_POLICY})")
    p.add_argument("--nic-port-quota", type=int, metavar="N",
                   help="at most N cached flows per ingress port")
    p.add_argument("--max-flows", type=int, metavar="N", help="host flow-table limit")
    p.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS",
                   help="idle timeout override, e.g. udp=10 (names: "
                        + ", ".join(Timeouts.__dataclass_fields__) + ")")
    p.add_argument("-c", "--count", type=int, metavar="N", help="stop after N packets")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                      help="progress bar on stderr (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    try:
        args.nic_kinds = _parse_kinds(args.nic_actions)
        args.timeouts = _parse_timeouts(args.timeout)
    except ValueError as e:
        p.error(str(e))
    if args.nic_capacity < 0:
        p.error("--nic-capacity must be >= 0")
    if args.compare is not None:
        if args.policy is not None or args.write:
            p.error("--compare OLD NEW CAPTURE takes no other policy, capture or --write")
    elif args.policy is None or args.capture is None:
        p.error("the following arguments are required: policy, capture (or --compare)")
    return args


def _parse_kinds(text: str | None) -> frozenset[ActionKind]:
    if text is None:
        return frozenset(ActionKind)
    kinds = set()
    for word in filter(None, (w.strip() for w in text.split(","))):
        try:
            kinds.add(ActionKind(word))
        except ValueError:
            valid = ", ".join(k.value for k in ActionKind)
            raise ValueError(f"--nic-actions: unknown action {word!r} (valid: {valid})") from None
    return frozenset(kinds)


def _parse_timeouts(items: list[str]) -> Timeouts:
    overrides: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--timeout {item!r}: expected NAME=SECONDS")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--timeout {item!r}: {value!r} is not a number") from None
    try:
        return Timeouts().with_overrides(**overrides)
    except TypeError as e:
        raise ValueError(f"--timeout: {e}") from None


# ----------------------------------------------------------------------------- formatting

def leaving_key(frame: bytes | None) -> tuple | None:
    if frame is None:
        return None
    h = pk.parse(frame)
    return None if isinstance(h, str) else pk.flow_key(h)


def record_json(n: int, ts_ns: int, r: Result) -> dict[str, Any]:
    """The --json object for one packet (field names are a documented interface)."""
    actions = r.flow.actions.describe() if r.flow is not None else None
    return {
        "n": n,
        "ts": ts_ns / 1e9,
        "ingress": r.ingress,
        "port": r.port,
        "direction": str(r.direction) if r.direction is not None else None,
        "path": r.path,
        "verdict": r.verdict,
        "reason": r.reason,
        "out_port": r.out_port,
        "layers": [{"port": s.port, "layer": s.layer, "direction": str(s.direction),
                    "rule": s.rule, "action": describe_action(s.action)} for s in r.steps],
        "flow": key_dict(r.key),
        "actions": actions,
        "offload": r.offload,
        "note": r.note,
        "leaves": key_dict(leaving_key(r.frame)) if r.verdict == "forward" else None,
    }


def record_text(n: int, ts_ns: int, r: Result) -> str:
    """Human trace of one packet: one line for hits, a layer-by-layer block for slow path."""
    where = f"{r.port or r.ingress} {r.direction or '-'}"
    head = f"#{n} {ts_ns / 1e9:.6f} {where} {key_text(r.key)}  path={r.path}"
    verdict = (f"forward -> {r.out_port}" if r.verdict == "forward"
               else f"drop ({r.reason})")
    if r.path != "slow" or not r.steps:
        text = r.note
        if text and r.reason == INTERNAL_ERROR:  # the traceback's last line; --json has it all
            text = text.strip().splitlines()[-1]
        note = f" [{text}]" if text else ""
        return f"{head} {verdict}{note}"
    lines = [head]
    for s in r.steps:
        action = describe_action(s.action)
        lines.append(f"    {s.port}/{s.layer} {s.direction}: rule {s.rule} -> {action}")
    if r.flow is not None:
        lines.append(f"    actions: {r.flow.actions.describe()}")
        rev = r.flow.reverse
        if rev is not None:
            lines.append(f"    reverse: {key_text(rev.key[1])} on {rev.key[0]}: "
                         f"{rev.actions.describe()}")
    if r.offload:
        lines.append(f"    offload: {r.offload}")
    lines.append(f"    verdict: {verdict}")
    if r.verdict == "forward":
        lines.append(f"    leaves: {key_text(leaving_key(r.frame))}")
    return "\n".join(lines)


def summary_text(s: dict[str, Any]) -> str:
    nic = s["nic"]
    lines = [
        "summary:",
        f"  packets {s['packets']} (forwarded {s['forwarded']}, dropped {s['dropped']}) "
        f"over {s['duration_s']:.3f} s of capture time",
        f"  paths: nic {s['paths']['nic']}, host {s['paths']['host']}, slow {s['paths']['slow']}",
        f"  flows: {s['flows']} connections created, {s['flows_active']} flows active, "
        f"{s['expiries']} expired, {s['flow_limit_refusals']} refused (flow limit)",
        f"  nic: {nic['entries']}/{nic['capacity']} entries, {nic['hits']} hits, "
        f"{nic['misses']} misses, {nic['offloads']} offloads, {nic['evictions']} evictions, "
        f"{nic['refusals']} refusals (actions: {','.join(nic['actions'])})",
    ]
    if s["drops"]:
        lines.append("  drops: " + ", ".join(f"{k} {v}" for k, v in s["drops"].items()))
    for cause, count in s.get("internal_errors", {}).items():
        lines.append(f"  internal error x{count}: {cause}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- running

@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar on stderr, or a no-op."""
    if not enabled:
        yield lambda _pos: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("replaying"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("replay", total=total)
        yield lambda pos: bar.update(task, completed=pos)


def run(args: argparse.Namespace, out: IO[str]) -> int:
    try:
        policy = load_policy(args.policy)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_FAILED
    try:
        capture = open_capture(args.capture)
    except CaptureError as e:
        print(f"appliance-trace: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        replayer = Replayer(
            policy,
            nic=SimNic(args.nic_capacity, args.nic_kinds, policy=args.nic_policy,
                       per_port=args.nic_port_quota),
            timeouts=args.timeouts,
            max_flows=args.max_flows,
            assignment=Assignment(args.port,
                                  Direction(args.direction) if args.direction else None),
        )
    except ValueError as e:
        print(f"appliance-trace: {e}", file=sys.stderr)
        return EXIT_USAGE
    show_progress = args.progress if args.progress is not None else sys.stderr.isatty()
    writer = PcapWriter(args.write) if args.write else None
    try:
        with capture, _progress(show_progress, capture.size) as tick:
            for n, cp, _frame, r in replayer.run(capture):
                if writer is not None and r.frame is not None:
                    writer.write(cp.ts_ns, r.frame)
                if args.json:
                    out.write(json.dumps(record_json(n, cp.ts_ns, r)) + "\n")
                elif not args.quiet:
                    out.write(record_text(n, cp.ts_ns, r) + "\n")
                if n & 0x3FFF == 0:
                    tick(capture.position)
                if args.count is not None and n >= args.count:
                    break
    finally:
        if writer is not None:
            writer.close()
    summary = replayer.summary_dict()
    summary["capture_warnings"] = capture.warnings
    if args.json:
        out.write(json.dumps({"summary": summary}) + "\n")
    else:
        out.write(summary_text(summary) + "\n")
    for w in capture.warnings:
        print(f"appliance-trace: warning: {w}", file=sys.stderr)
    if summary["internal_errors"]:
        # a bug in appliance, not in the capture: the run is complete, but it must not pass
        for cause, count in summary["internal_errors"].items():
            print(f"appliance-trace: internal error x{count}: {cause} (a bug; the packets are "
                  "reported as drop internal_error, --json has the traceback)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare is not None:
        from appliance.cli import compare

        return compare.main(args)
    try:
        return run(args, sys.stdout)
    except BrokenPipeError:
        sys.stderr.close()  # output piped into `head`: not an error
        return EXIT_OK
    except OSError as e:
        print(f"appliance-trace: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
