#!/usr/bin/env bash
# Size budget: fails if a stripped cross binary is missing or larger than its limit in
# cross/size-budget.txt. Run cross/build.sh first (cross/ci.sh does both).
#
#   cross/check-size.sh [BIN_DIR]     BIN_DIR defaults to target/cross/bin
#
# Prints one line per binary: target, binary, size, limit, headroom. Raising a limit is a
# deliberate change to size-budget.txt, reviewed like code; docs/PERFORMANCE.md says why.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

bin_dir="${1:-$CROSS_TARGET_DIR/bin}"
budget="$CROSS_ROOT/cross/size-budget.txt"
fail=0
checked=0
printf '%-32s %-16s %10s %10s %9s\n' target binary bytes limit headroom
while read -r target bin limit _; do
    case "$target" in '' | \#*) continue ;; esac
    file="$bin_dir/$target/$bin"
    if [ ! -f "$file" ]; then
        printf '%-32s %-16s %10s %10s %9s\n' "$target" "$bin" missing "$limit" -
        fail=1
        continue
    fi
    size="$(stat -c %s "$file")"
    headroom="$(awk -v s="$size" -v l="$limit" 'BEGIN { printf "%.1f%%", (l - s) * 100 / l }')"
    printf '%-32s %-16s %10d %10d %9s\n' "$target" "$bin" "$size" "$limit" "$headroom"
    checked=$((checked + 1))
    if [ "$size" -gt "$limit" ]; then
        echo "size budget exceeded: $file is $size bytes, limit $limit (cross/size-budget.txt)" >&2
        fail=1
    fi
done <"$budget"
[ "$checked" -gt 0 ] || { echo "no binaries checked" >&2; exit 1; }
if [ "$fail" = 0 ]; then
    echo "size budget: $checked binaries within their limits"
fi
exit "$fail"
