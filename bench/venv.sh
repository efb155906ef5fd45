#!/usr/bin/env bash
# The benchmark's own environment, as the harness README sets it up: a venv (bench/.venv) that
# holds qworker (editable), the peers and py-spy, at the versions the invoking interpreter has,
# and nothing else. A machine's Python carries tools of its own (here awscli's colorama and
# playwright's greenlet), which structlog imports when present: +1.5 MiB in every qworker
# worker's RSS that a user's deployment does not have. Then:
#   PYTHON=bench/.venv/bin/python bench/run.sh ...
# The results name the interpreter and whether either package was importable.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${PYTHON:-python3}"
"$base" -m venv bench/.venv
# Same versions as the interpreter CI installs into (qworker itself excluded: it is editable).
"$base" -m pip freeze --exclude-editable | grep -v -e '^qworker' -e ' @ file:' > bench/.venv/constraints.txt
bench/.venv/bin/pip install --quiet --constraint bench/.venv/constraints.txt --editable '.[bench]' py-spy
bench/.venv/bin/python - <<'PY'
import importlib.util
present = [n for n in ("greenlet", "colorama") if importlib.util.find_spec(n)]
print("bench/.venv ready; structlog's optional imports present:", ", ".join(present) or "none")
PY
