#!/usr/bin/env bash
# Builds stripped, fully static musl binaries of qpq-server-lite (or another workspace binary)
# for routers and single-board computers, installing the prerequisites it lacks.
#
#   cross/build.sh [OPTIONS] TARGET...       TARGET: a triple from cross/targets.txt, or "all"
#
#   --bin NAME        binary to build (repeatable); default qpq-server-lite. `--bin qpq` builds
#                     the terminal client (package qpq-tui).
#   -p, --package P   cargo package holding the binaries (default: derived from --bin)
#   --out DIR         where the binaries go; default target/cross/bin/TARGET/
#   --prebuilt-std    link rustup's prebuilt std where it exists (bigger: see below)
#   --no-install      fail instead of installing missing prerequisites (QPQ_CROSS_NO_INSTALL=1)
#   --env             print the environment (export lines) for TARGET instead of building
#   -h, --help        this text
#
# Output: target/cross/bin/TARGET/NAME, plus one line per binary on stdout:
#   TARGET NAME SIZE_BYTES PATH
# Cargo works in target/cross (QPQ_CROSS_TARGET_DIR), never in the main target/ dir.
# Extra rustc flags for the target: QPQ_CROSS_RUSTFLAGS. The release profile is the
# workspace's (opt-level z, fat LTO, one codegen unit, panic abort, strip). On top of it, std
# is rebuilt with that profile (-Zbuild-std) and without unwind tables, which panic=abort
# never reads: 21 % smaller on aarch64 (docs/PERFORMANCE.md). A panic still prints its
# message; only backtraces are lost. ARMv7 code is Thumb-2 (-C target-feature=+thumb-mode,
# which rustc calls unstable and warns about): 29 % smaller than A32.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

bins=()
package=""
out=""
print_env=""
prebuilt_std=""
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) bins+=("${2:?--bin needs a name}"); shift 2 ;;
        --bin=*) bins+=("${1#--bin=}"); shift ;;
        -p | --package) package="${2:?--package needs a name}"; shift 2 ;;
        --package=*) package="${1#--package=}"; shift ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --no-install) export QPQ_CROSS_NO_INSTALL=1; shift ;;
        --prebuilt-std) prebuilt_std=1; shift ;;
        --env) print_env=1; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) cross_die "unknown option $1 (see --help)" ;;
        all) mapfile -t -O "${#targets[@]}" targets < <(cross_all_targets); shift ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || { usage >&2; exit 2; }
[ ${#bins[@]} -gt 0 ] || bins=(qpq-server-lite)
if [ -n "$out" ] && [ ${#targets[@]} -gt 1 ]; then
    cross_die "--out takes one target"
fi

[ -n "$prebuilt_std" ] || export QPQ_CROSS_BUILD_STD=1

cd "$CROSS_ROOT"
for target in "${targets[@]}"; do
    cross_setup "$target"
    CROSS_EXTRA_RUSTFLAGS=""
    if [ -z "$prebuilt_std" ]; then
        CROSS_EXTRA_RUSTFLAGS="-C force-unwind-tables=no${T_SIZE_RUSTFLAGS:+ $T_SIZE_RUSTFLAGS}"
    fi
    if [ -n "$print_env" ]; then
        (
            cross_env "$target"
            env | grep -E '^(CARGO_TARGET_|CC_|AR_|CFLAGS_|RUSTC_BOOTSTRAP=)' | sort |
                sed -e 's/^/export /' -e "s/=\(.*\)/='\1'/"
            echo "# cargo flags: ${CROSS_CARGO_FLAGS[*]:-none}"
        )
        continue
    fi
    (
        cross_env "$target"
        for bin in "${bins[@]}"; do
            pkg="${package:-$(cross_package_of "$bin")}"
            cross_log "building $bin ($pkg) for $target${T_BUILD_STD:+ with -Zbuild-std}"
            cargo build --release --locked --target "$target" ${CROSS_CARGO_FLAGS[@]+"${CROSS_CARGO_FLAGS[@]}"} \
                -p "$pkg" --bin "$bin" >&2
            src="$CARGO_TARGET_DIR/$target/release/$bin"
            dest_dir="${out:-$CROSS_TARGET_DIR/bin/$target}"
            mkdir -p "$dest_dir"
            dest="$dest_dir/$bin"
            cp "$src" "$dest.tmp"
            strip_tool="${T_GCC:+$T_GCC-}strip"
            command -v "$strip_tool" >/dev/null 2>&1 || strip_tool=strip
            "$strip_tool" --strip-all "$dest.tmp"
            mv "$dest.tmp" "$dest"
            cross_check_static "$dest"
            cross_check_float "$dest"
            echo "$target $bin $(stat -c %s "$dest") $dest"
        done
    )
done
