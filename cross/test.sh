#!/usr/bin/env bash
# Runs the unit tests of the portable crates for a cross target under qemu-user
# (CARGO_TARGET_<T>_RUNNER=qemu-<arch>-static), installing the prerequisites it lacks.
#
#   cross/test.sh TARGET [-p PACKAGE]... [-- ARGS FOR THE TEST BINARIES]
#
# Default packages: qpq-proto and qpq-core (the code that runs on both ends and has the most
# arithmetic, encoding and crypto that could differ on 32-bit or big-endian-free ARM).
# Builds in target/cross like cross/build.sh; debug profile, so std is built with unwinding.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

target=""
pkgs=()
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        -p | --package) pkgs+=(-p "${2:?}"); shift 2 ;;
        --no-install) export QPQ_CROSS_NO_INSTALL=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        --) shift; rest=("$@"); break ;;
        -*) cross_die "unknown option $1" ;;
        *) [ -z "$target" ] || cross_die "one target at a time"; target="$1"; shift ;;
    esac
done
[ -n "$target" ] || cross_die "usage: cross/test.sh TARGET"
[ ${#pkgs[@]} -gt 0 ] || pkgs=(-p qpq-proto -p qpq-core)

cd "$CROSS_ROOT"
cross_setup "$target"
# Tests unwind: build the whole std (cargo adds `test` and panic_unwind) when std is built.
CROSS_BUILD_STD_CRATES=std
cross_env "$target"
cross_log "cargo test ${pkgs[*]} for $target${T_QEMU:+ under $T_QEMU}"
exec cargo test --locked --target "$target" ${CROSS_CARGO_FLAGS[@]+"${CROSS_CARGO_FLAGS[@]}"} \
    "${pkgs[@]}" -- ${rest[@]+"${rest[@]}"}
