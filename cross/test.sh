#!/usr/bin/env bash
# Runs the unit tests of the portable crates for a cross target under qemu-user
# (CARGO_TARGET_<T>_RUNNER=qemu-<arch>-static), installing the prerequisites it lacks.
#
#   cross/test.sh TARGET [CARGO TEST OPTIONS]... [-- ARGS FOR THE TEST BINARIES]
#
# Default: -p qpq-proto -p qpq-core --features qpq-core/client, i.e. the frame codec and the
# client-side crypto with MLS (X-Wing), the vault and the client engine: the code that runs on
# both ends and has the most arithmetic, encoding and crypto that could differ on 32-bit ARM.
# Options such as -p, --features or --test replace that default selection.
# Builds in target/cross like cross/build.sh, in the test profile (debug assertions and
# overflow checks on, std built with unwinding) at opt-level 1 without debuginfo: emulated
# debug builds of openmls are ~25x slower (armv7: 633 s against 24 s for tests/mls_storage.rs).
# Set CARGO_PROFILE_DEV_OPT_LEVEL / CARGO_PROFILE_DEV_DEBUG to override.
# Library and integration tests only: doctests are target-independent examples, and rustdoc
# does not take the target's linker flags (they run natively with cargo test).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

target=""
cargo_args=()
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-install) export QPQ_CROSS_NO_INSTALL=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --) shift; rest=("$@"); break ;;
        -*) cargo_args+=("$1"); shift ;;
        *)
            if [ -z "$target" ]; then target="$1"; else cargo_args+=("$1"); fi
            shift
            ;;
    esac
done
[ -n "$target" ] || cross_die "usage: cross/test.sh TARGET [CARGO TEST OPTIONS]"
[ ${#cargo_args[@]} -gt 0 ] || cargo_args=(-p qpq-proto -p qpq-core --features qpq-core/client --lib --tests)

export CARGO_PROFILE_DEV_OPT_LEVEL="${CARGO_PROFILE_DEV_OPT_LEVEL:-1}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-0}"

cd "$CROSS_ROOT"
cross_setup "$target"
# Tests unwind: build the whole std (cargo adds `test` and panic_unwind) when std is built.
CROSS_BUILD_STD_CRATES=std
cross_env "$target"
cross_log "cargo test ${cargo_args[*]} for $target${T_QEMU:+ under $T_QEMU}"
exec cargo test --locked --target "$target" ${CROSS_CARGO_FLAGS[@]+"${CROSS_CARGO_FLAGS[@]}"} \
    "${cargo_args[@]}" -- ${rest[@]+"${rest[@]}"}
