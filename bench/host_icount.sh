#!/bin/bash
# Instructions per call under callgrind (see bench/host_icount.py):
#   bash bench/host_icount.sh [CALLS] [CANDIDATE ...]   (default: 2000 calls; eval train peft_eval peft_train bare_eval bare_train)
# Each candidate runs twice (0 and CALLS calls after the same warm-up); slow (importing torch under
# callgrind takes about three minutes a run).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HERE/../.venv/bin/python}
CALLS=${1:-2000}; shift || true
NAMES=${*:-eval train peft_eval peft_train bare_eval bare_train}
TMP=$(mktemp -d)
total() { valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.out" "$PY" "$HERE/host_icount.py" "$1" "$2" >/dev/null 2>&1
          grep -m1 '^totals:' "$TMP/cg.out" | awk '{print $2}'; }
echo "| candidate | instructions per call |"
echo "|---|---|"
for name in $NAMES; do
  zero=$(total "$name" 0); many=$(total "$name" "$CALLS")
  echo "| $name | $(( (many - zero) / CALLS )) |"
done
rm -rf "$TMP"
