#!/usr/bin/env bash
# Short fuzz run for CI: builds every cargo-fuzz target in fuzz/ and runs each for
# FUZZ_SECONDS (default 25) from the committed seed corpus. A crash, a failed check or a
# timeout fails the script (libFuzzer exits non-zero and leaves the input in fuzz/artifacts/).
# Longer runs: see fuzz/README.md.
#
# The machine has the stable toolchain only; RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
# nightly flags (-Zsanitizer=address and the sancov passes) to stable rustc.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-25}"
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=(frame_decode handlers client ipc)

echo "== cargo fuzz build (${targets[*]})"
(cd fuzz && cargo fuzz build)
# cargo-fuzz has no --locked: check instead that the build did not move fuzz/Cargo.lock.
if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
    git diff --exit-code -- fuzz/Cargo.lock
fi

# New inputs go to a scratch directory; the committed seeds are only read. The targets keep
# their stores in $TMPDIR, set to the scratch directory (on a RAM disk when there is one: the
# server's store fsyncs every commit). Everything is removed at the end.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    scratch="$(mktemp -d -p /dev/shm qpq-fuzz.XXXXXX)"
else
    scratch="$(mktemp -d)"
fi
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"

for t in "${targets[@]}"; do
    echo "== cargo fuzz run $t (${seconds}s)"
    mkdir -p "$scratch/corpus-$t"
    (cd fuzz && cargo fuzz run "$t" "$scratch/corpus-$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1)
done
echo "== fuzz: no crashes"
