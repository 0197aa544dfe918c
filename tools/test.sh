#!/usr/bin/env bash
# Install everything (system packages + .venv) and run the whole suite, then lint.
# pytest's exit code 5 ("no tests collected") is a failure here: a suite that ran nothing
# must never look green.
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests: failing" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
.venv/bin/ruff check appliance tests tools || exit 1
.venv/bin/mypy appliance || { echo "test: mypy found type errors in appliance/" >&2; exit 1; }
.venv/bin/python tools/bench/classifier.py --quick >/dev/null || { echo "test: classifier bench smoke run failed" >&2; exit 1; }
.venv/bin/python tools/bench/conn_rate.py --quick >/dev/null || { echo "test: conn_rate bench smoke run failed" >&2; exit 1; }
# The packages: built, linted, installed in a throwaway Debian root, upgraded, purged (~4-6 min).
if [ "$(id -u)" -eq 0 ]; then
    tools/test-packages.sh || { echo "test: packaging acceptance failed" >&2; exit 1; }
else
    echo "test: packaging acceptance skipped (needs root)" >&2
fi
echo "test: ok"
