"""appliance-check-config: validate policy files without touching the datapath.

Meant for CI and for operators before a reload: every problem in every file is printed, one
``FILE: PATH: REASON`` line each, so a broken policy is fixed in one round trip. Rules that
validate but can never match are printed as warnings (`appliance.policylint`); they do not
change the exit status.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import Final

from appliance.model import Policy
from appliance.policy import ConfigError, load_policy
from appliance.policylint import policy_warnings

EXIT_OK: Final = 0
EXIT_INVALID: Final = 1  # usage errors exit 2, argparse's own convention


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance-check-config",
        description="Validate appliance policy files; print every error found.",
    )
    parser.add_argument("policies", metavar="POLICY", nargs="+", help="policy YAML file")
    return parser


def _summary(path: str, policy: Policy) -> str:
    """One line that shows the file was understood as intended, not merely parsed."""
    rules = sum(len(layer.outbound) + len(layer.inbound) for layer in policy.layers.values())
    return f"{path}: ok ({len(policy.ports)} ports, {len(policy.layers)} layers, {rules} rules)"


def _check(path: str) -> bool:
    """Validate one file, report on stdout/stderr, and say whether it is valid."""
    try:
        policy = load_policy(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return False
    except Exception as exc:  # a checker must never answer with a traceback
        print(f"{path}: internal error while checking: {exc!r}", file=sys.stderr)
        return False
    print(_summary(path, policy))
    for line in policy_warnings(policy):
        print(f"warning: {line}", file=sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Check every POLICY (all of them, even after a failure); 0 if all valid, else 1."""
    args = _parser().parse_args(argv)
    results = [_check(path) for path in args.policies]
    return EXIT_OK if all(results) else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
