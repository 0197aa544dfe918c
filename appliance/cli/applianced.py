"""applianced: the live switch daemon (kernel TC/BPF datapath, upcalls, ageing).

    applianced --config /etc/appliance/appliance.toml
    applianced --policy policy.yaml          # defaults for everything else
    applianced --check [--config F] [--policy P]
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from appliance.daemon.settings import DEFAULT_SETTINGS, Settings, load_settings
from appliance.model import Policy
from appliance.policy import ConfigError, parse_policy

GC_THRESHOLDS = (50_000, 20, 100)  # allocations, gen0 runs, gen1 runs
EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_CRASH = 70  # EX_SOFTWARE: a task crashed; the unit restarts the daemon


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="applianced", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path,
                   help=f"settings file (TOML; default {DEFAULT_SETTINGS} if it exists)")
    p.add_argument("--policy", type=Path, help="policy file (overrides the settings' policy)")
    p.add_argument("--check", action="store_true",
                   help="validate settings and policy, then exit (0 ok, 1 errors)")
    p.add_argument("--headless", action="store_true", default=None,
                   help="on exit, leave the kernel datapath forwarding")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Settings, Policy, str]:
    """Settings, the policy, and the exact text it was parsed from (operators edit that)."""
    path = args.config
    if path is None and DEFAULT_SETTINGS.exists():
        path = DEFAULT_SETTINGS
    settings = load_settings(path, policy=args.policy, headless=args.headless,
                             log_format=args.log_format, log_level=args.log_level)
    try:
        text = settings.policy.read_text()
    except OSError as e:
        raise ConfigError([f"{settings.policy}: cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{settings.policy}: not UTF-8 text (byte {e.start})"]) from None
    return settings, parse_policy(text, source=str(settings.policy)), text


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings, policy, text = load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{settings.policy}: ok ({len(policy.ports)} ports, {len(policy.layers)} layers)")
        return EXIT_OK
    from appliance.daemon import logs, sdnotify
    from appliance.daemon.app import Daemon, StartupError

    logs.configure(settings.log_format, settings.log_level)
    # Flows are many long-lived objects: with the default thresholds a full collection
    # (tens of ms with 100k flows) would run every few thousand new flows and stall the slow
    # path; collect young objects often, the old generation rarely.
    gc.set_threshold(*GC_THRESHOLDS)
    daemon = Daemon(settings, policy, text)

    async def notify_ready() -> None:
        await daemon.ready.wait()
        sdnotify.notify("READY=1")

    async def serve() -> None:
        # not nursery.start(daemon.run): a SIGTERM during start-up ends run() before it is
        # ready, and that is a clean stop, not an error
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify_ready)
            await daemon.run()
            nursery.cancel_scope.cancel()

    failures: list[str] = []
    crashed = False
    try:
        trio.run(serve)
    except* StartupError as group:
        failures = [str(e) for e in _leaves(group)]
    except* KeyboardInterrupt:  # a second Ctrl-C while stopping
        pass
    except* Exception as group:
        # A whole task died (per-packet, per-request and per-event faults never get here).
        # The daemon has already stopped failing static (the kernel keeps forwarding): log
        # why, and exit non-zero for systemd to restart us, never half alive.
        crashed = True
        import structlog

        for exc in _leaves(group):
            structlog.get_logger("appliance.daemon").critical(
                "crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
    if failures:
        for failure in failures:
            print(f"applianced: {failure}", file=sys.stderr)
        return EXIT_CONFIG
    if crashed:
        return EXIT_CRASH
    sdnotify.notify("STOPPING=1")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
