"""applianced: the live switch daemon (kernel TC/BPF datapath, upcalls, ageing).

    applianced --config /etc/appliance/appliance.toml
    applianced --policy policy.yaml          # defaults for everything else
    applianced --policy etcd://HOST:PORT[,HOST:PORT...]/KEY   # policy from etcd, watched
    applianced --check [--config F] [--policy P]
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from appliance.daemon.policysource import EtcdPolicySource, SourceOptions, parse_value
from appliance.daemon.settings import DEFAULT_SETTINGS, Settings, load_settings
from appliance.etcd import EtcdError
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
    p.add_argument("--policy", help="policy file or etcd://HOST:PORT[,...]/KEY (overrides the "
                                    "settings' policy)")
    p.add_argument("--check", action="store_true",
                   help="validate settings and policy, then exit (0 ok, 1 errors)")
    p.add_argument("--headless", action="store_true", default=None,
                   help="on exit, leave the kernel datapath forwarding")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> Settings:
    path = args.config
    if path is None and DEFAULT_SETTINGS.exists():
        path = DEFAULT_SETTINGS
    return load_settings(path, policy=args.policy, headless=args.headless,
                         log_format=args.log_format, log_level=args.log_level)


def load(args: argparse.Namespace) -> tuple[Settings, Policy, str]:
    """Settings, the policy, and the exact text it was parsed from (operators edit that)."""
    settings = load_config(args)
    try:
        text = Path(settings.policy).read_text()
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


def etcd_source(settings: Settings) -> EtcdPolicySource:
    """The policy source for an ``etcd://`` policy setting (ConfigError if unusable)."""
    url = settings.policy_url
    assert url is not None
    e = settings.etcd
    password = None
    if e.password_file is not None:
        try:
            lines = e.password_file.read_text().splitlines()
        except OSError as err:
            raise ConfigError([f"{e.password_file}: cannot read: {err.strerror}"]) from None
        password = lines[0] if lines else ""
    try:
        tls = e.tls()
        options = SourceOptions(cache=e.cache, tls=tls, user=e.user, password=password,
                                connect_timeout=e.connect_timeout,
                                request_timeout=e.request_timeout,
                                health_interval=e.health_interval,
                                backoff_initial=e.backoff_initial, backoff_max=e.backoff_max)
        return EtcdPolicySource(url, options)
    except (OSError, ValueError) as err:  # unreadable CA/cert files
        raise ConfigError([f"etcd TLS settings: {err}"]) from None


def check_etcd(source: EtcdPolicySource) -> int:
    """``--check`` with an etcd source: read the key once and validate it."""
    async def read() -> int:
        try:
            result = await source.client.get(source.key)
        except EtcdError as e:
            print(f"{source.url}: cannot read: {e}", file=sys.stderr)
            return EXIT_CONFIG
        finally:
            await source.client.aclose()
        if result.kv is None:
            print(f"{source.url}: no such key", file=sys.stderr)
            return EXIT_CONFIG
        try:
            policy, _ = parse_value(result.kv)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return EXIT_CONFIG
        print(f"{policy.source}: ok ({len(policy.ports)} ports, {len(policy.layers)} layers)")
        return EXIT_OK

    return trio.run(read)


async def wait_for_policy(source: EtcdPolicySource) -> tuple[Policy, str] | None:
    """The source's first policy; None if SIGTERM/SIGINT came first (a clean stop)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
        async with trio.open_nursery() as nursery:
            found: list[tuple[Policy, str]] = []

            async def first() -> None:
                found.append(await source.initial())
                nursery.cancel_scope.cancel()

            nursery.start_soon(first)
            async for _ in sigs:
                nursery.cancel_scope.cancel()
                break
    return found[0] if found else None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source: EtcdPolicySource | None = None
    try:
        settings = load_config(args)
        if settings.policy_url is not None:
            source = etcd_source(settings)
            if args.check:
                return check_etcd(source)
            policy, text = None, ""
        else:
            settings, policy, text = load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        assert policy is not None
        print(f"{settings.policy}: ok ({len(policy.ports)} ports, {len(policy.layers)} layers)")
        return EXIT_OK
    from appliance.daemon import logs, sdnotify
    from appliance.daemon.app import Daemon, StartupError

    logs.configure(settings.log_format, settings.log_level)
    # Flows are many long-lived objects: with the default thresholds a full collection
    # (tens of ms with 100k flows) would run every few thousand new flows and stall the slow
    # path; collect young objects often, the old generation rarely.
    gc.set_threshold(*GC_THRESHOLDS)

    async def serve() -> None:
        nonlocal policy, text
        if source is not None:  # etcd: not ready (no READY=1) until a policy is known
            first = await wait_for_policy(source)
            if first is None:
                await source.aclose()
                return
            policy, text = first
        assert policy is not None
        daemon = Daemon(settings, policy, text)
        daemon.policy_source = source

        async def notify_ready() -> None:
            await daemon.ready.wait()
            sdnotify.notify("READY=1")

        # not nursery.start(daemon.run): a SIGTERM during start-up ends run() before it is
        # ready, and that is a clean stop, not an error
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notify_ready)
                await daemon.run()
                nursery.cancel_scope.cancel()
        finally:
            if source is not None:
                await source.aclose()

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
