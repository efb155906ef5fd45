#!/usr/bin/env bash
# The whole peer comparison in one command; see bench/README.md and `bench/run.sh --help`.
#   bench/run.sh                 # all peers + both qworker contenders, N=10000, 3 reps
#   bench/run.sh --smoke         # CI: raw aio-pika + qworker, N=300, 1 rep, checks only
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/run.py "$@"
