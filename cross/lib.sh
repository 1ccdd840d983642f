# shellcheck shell=bash
# Shared by cross/build.sh, cross/test.sh and cross/ci.sh: what each target needs, how to
# install it, and the environment cargo needs to build for it. Source it; don't run it.
#
# Targets (see targets.txt):
#   x86_64-unknown-linux-musl        rust-std from rustup, Debian musl-tools (musl-gcc)
#   aarch64-unknown-linux-musl       rust-std from rustup, Debian gcc-aarch64-linux-gnu + libc6-dev-arm64-cross
#   armv7-unknown-linux-musleabihf   no rust-std is served: -Zbuild-std, Debian
#                                    gcc-arm-linux-gnueabihf + musl-dev:armhf through gcc specs
#   armv7-unknown-linux-musleabi     the same, soft-float: gcc-arm-linux-gnueabi + musl-dev:armel
# Any target whose rust-std rustup cannot install falls back to -Zbuild-std with Debian's musl.

CROSS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A target dir of its own, so cross builds never invalidate the main target/ artefacts.
CROSS_TARGET_DIR="${QPQ_CROSS_TARGET_DIR:-$CROSS_ROOT/target/cross}"

cross_log() { printf '%s\n' "cross: $*" >&2; }
cross_die() {
    printf '%s\n' "cross: error: $*" >&2
    exit 1
}

# Sets, for target $1: T_GCC (cross gcc prefix, empty = host), T_APT (Debian packages),
# T_DEBARCH + T_MUSL (Debian architecture and musl triple, for the build-std fallback),
# T_QEMU (user-mode emulator, empty = runs natively), T_FLOAT (hard|soft, ARM only),
# T_SIZE_RUSTFLAGS (release-only rustc flags that make the binary smaller).
cross_target_info() {
    T_FLOAT="" T_SIZE_RUSTFLAGS=""
    case "$1" in
        x86_64-unknown-linux-musl)
            T_GCC="" T_APT="musl-tools" T_DEBARCH=amd64 T_MUSL=x86_64-linux-musl T_QEMU="" ;;
        aarch64-unknown-linux-musl)
            # The cross gcc alone (installed without recommends) brings no target headers:
            # ring's C wants stdint.h and its bits/. libc6-dev-arm64-cross has them.
            T_GCC=aarch64-linux-gnu T_APT="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
            T_DEBARCH=arm64
            T_MUSL=aarch64-linux-musl T_QEMU=qemu-aarch64-static ;;
        armv7-unknown-linux-musleabihf)
            T_GCC=arm-linux-gnueabihf T_APT="gcc-arm-linux-gnueabihf" T_DEBARCH=armhf
            T_MUSL=arm-linux-musleabihf T_QEMU=qemu-arm-static T_FLOAT=hard
            # Thumb-2 instead of A32 code: 29 % smaller, and every ARMv7-A core runs it.
            T_SIZE_RUSTFLAGS="-C target-feature=+thumb-mode" ;;
        armv7-unknown-linux-musleabi)
            T_GCC=arm-linux-gnueabi T_APT="gcc-arm-linux-gnueabi" T_DEBARCH=armel
            T_MUSL=arm-linux-musleabi T_QEMU=qemu-arm-static T_FLOAT=soft
            T_SIZE_RUSTFLAGS="-C target-feature=+thumb-mode" ;;
        *) cross_die "unknown target '$1' (see cross/targets.txt)" ;;
    esac
}

# The targets listed in targets.txt, in order.
cross_all_targets() {
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$CROSS_ROOT/cross/targets.txt" | awk '{print $1}'
}

# Upper-case, underscored triple for CARGO_TARGET_<T>_* variables.
cross_env_name() { printf '%s' "$1" | tr 'a-z-' 'A-Z_'; }

cross_as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        cross_die "need root for: $*"
    fi
}

CROSS_APT_UPDATED=""
cross_apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "${QPQ_CROSS_NO_INSTALL:-}" = 1 ] && cross_die "missing Debian packages: ${missing[*]}"
    cross_log "apt-get install ${missing[*]}"
    if [ -z "$CROSS_APT_UPDATED" ]; then
        cross_as_root apt-get update -q >/dev/null || cross_log "apt-get update reported errors"
        CROSS_APT_UPDATED=1
    fi
    cross_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        cross_die "apt-get install ${missing[*]} failed"
}

cross_rustup() {
    command -v rustup >/dev/null 2>&1 || cross_die "rustup not found"
    # Never let a CI run replace rustup itself.
    rustup set auto-self-update disable >/dev/null 2>&1 || true
    rustup "$@"
}

# Whether rust-std for $1 is installed, installing it if rustup serves it.
cross_has_rust_std() {
    local sysroot
    sysroot="$(rustc --print sysroot)"
    [ -d "$sysroot/lib/rustlib/$1/lib" ] && return 0
    [ "${QPQ_CROSS_NO_INSTALL:-}" = 1 ] && return 1
    cross_log "rustup target add $1"
    cross_rustup target add "$1" >/dev/null 2>&1
}

# Unpacks Debian's musl-dev for $T_DEBARCH into $CROSS_TARGET_DIR/sysroot/$T_DEBARCH and
# writes a gcc specs file that makes the Debian cross gcc compile and link against it.
# Uses a private apt state directory, so the machine's dpkg architectures stay untouched.
cross_musl_sysroot() {
    local dir="$CROSS_TARGET_DIR/sysroot/$T_DEBARCH"
    T_SYSROOT="$dir"
    T_SPECS="$dir/musl-gcc.specs"
    [ -f "$T_SPECS" ] && [ -f "$dir/lib/libunwind.a" ] && return 0
    [ "${QPQ_CROSS_NO_INSTALL:-}" = 1 ] && cross_die "no musl sysroot in $dir"
    local apt="$CROSS_TARGET_DIR/apt-$T_DEBARCH"
    rm -rf "$apt" "$dir"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb" "$dir/lib"
    : >"$apt/status"
    local opts=(-o "APT::Architecture=$T_DEBARCH" -o "APT::Architectures::=$T_DEBARCH"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o "Dir::State::status=$apt/status" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root)
    cross_log "downloading Debian musl-dev:$T_DEBARCH"
    # A mirror mid-sync can fail one index (security, say); musl-dev comes from main.
    apt-get "${opts[@]}" update -q >"$apt/update.log" 2>&1 || true
    (cd "$apt/deb" && apt-get "${opts[@]}" download "musl-dev:$T_DEBARCH" >"$apt/download.log" 2>&1) ||
        cross_die "apt-get download musl-dev:$T_DEBARCH failed; see $apt/download.log"
    dpkg-deb -x "$apt/deb"/musl-dev_*.deb "$dir"
    local lib="$dir/usr/lib/$T_MUSL" inc="$dir/usr/include/$T_MUSL"
    [ -f "$lib/libc.a" ] && [ -f "$lib/rcrt1.o" ] || cross_die "musl-dev:$T_DEBARCH has no $T_MUSL libc"
    # Debian's specs point at /usr/lib/$T_MUSL; ours point into the unpacked tree and pick
    # rcrt1.o for static-pie links (rustc links musl executables as static-pie).
    cat >"$T_SPECS" <<EOF
%rename cpp_options old_cpp_options

*cpp_options:
-nostdinc -isystem $inc -isystem include%s %(old_cpp_options)

*cc1:
%(cc1_cpu) -nostdinc -isystem $inc -isystem include%s

*link_libgcc:
-L$lib -L .%s

*libgcc:
libgcc.a%s %:if-exists(libgcc_eh.a%s)

*startfile:
%{!shared: %{static-pie:$lib/rcrt1.o;:$lib/Scrt1.o}} $lib/crti.o crtbeginS.o%s

*endfile:
crtendS.o%s $lib/crtn.o

*link:
-nostdlib %{shared:-shared} %{static:-static} %{static-pie:-static -pie --no-dynamic-linker -z text} %{rdynamic:-export-dynamic}

EOF
    # std's unwind crate links -lunwind; libgcc_eh is the unwinder the cross gcc brings
    # (without it, __aeabi_unwind_cpp_pr0 is undefined on ARM).
    local eh
    eh="$("$T_GCC-gcc" -print-file-name=libgcc_eh.a)"
    [ -f "$eh" ] || cross_die "$T_GCC-gcc has no libgcc_eh.a"
    cp "$eh" "$dir/lib/libunwind.a"
}

# Installs everything target $1 needs: Debian cross gcc, qemu-user (unless native),
# rust-std or rust-src + Debian's musl. Sets T_BUILD_STD=1 when std must be built.
cross_setup() {
    cross_target_info "$1"
    local pkgs=($T_APT binutils)
    [ -n "$T_QEMU" ] && pkgs+=(qemu-user-static)
    cross_apt_install "${pkgs[@]}"
    T_BUILD_STD="" T_SYSROOT=""
    if cross_has_rust_std "$1"; then
        # rustup's rust-std carries musl's crt objects and libc.a ("self-contained").
        [ "${QPQ_CROSS_BUILD_STD:-}" = 1 ] && T_BUILD_STD=1
    else
        [ -n "$T_GCC" ] || cross_die "no rust-std for $1 and no cross gcc to build one with"
        T_BUILD_STD=1
        cross_musl_sysroot
    fi
    if [ -n "$T_BUILD_STD" ] &&
        ! cross_rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
        [ "${QPQ_CROSS_NO_INSTALL:-}" = 1 ] && cross_die "rust-src is not installed"
        cross_log "rustup component add rust-src"
        cross_rustup component add rust-src >/dev/null 2>&1 || cross_die "rust-src failed"
    fi
}

# Exports the environment cargo needs for target $1 (after cross_setup) and sets the array
# CROSS_CARGO_FLAGS (extra cargo arguments: -Zbuild-std).
cross_env() {
    local t="$1" u e
    u="$(printf '%s' "$t" | tr '-' '_')"
    e="$(cross_env_name "$t")"
    export CARGO_TARGET_DIR="$CROSS_TARGET_DIR"
    CROSS_CARGO_FLAGS=()
    local rustflags=""
    if [ -n "$T_BUILD_STD" ]; then
        export RUSTC_BOOTSTRAP=1
        CROSS_CARGO_FLAGS+=("-Zbuild-std=${CROSS_BUILD_STD_CRATES:-std,panic_abort}")
    fi
    if [ -n "$T_SYSROOT" ]; then
        # Debian's musl through the cross gcc and the specs file.
        export "CC_$u=$T_GCC-gcc" "AR_$u=$T_GCC-ar"
        export "CFLAGS_$u=-specs=$T_SPECS"
        export "CARGO_TARGET_${e}_LINKER=$T_GCC-gcc"
        rustflags="-C link-self-contained=no -C link-arg=-specs=$T_SPECS -L native=$T_SYSROOT/lib"
    elif [ -n "$T_GCC" ]; then
        export "CC_$u=$T_GCC-gcc" "AR_$u=$T_GCC-ar"
        export "CARGO_TARGET_${e}_LINKER=$T_GCC-gcc"
    else
        export "CC_$u=musl-gcc"
    fi
    rustflags="$rustflags${CROSS_EXTRA_RUSTFLAGS:+ $CROSS_EXTRA_RUSTFLAGS}"
    rustflags="$rustflags${QPQ_CROSS_RUSTFLAGS:+ $QPQ_CROSS_RUSTFLAGS}"
    export "CARGO_TARGET_${e}_RUSTFLAGS=${rustflags# }"
    if [ -n "$T_QEMU" ]; then
        export "CARGO_TARGET_${e}_RUNNER=$T_QEMU"
    fi
}

# The cargo package that holds binary $1.
cross_package_of() {
    case "$1" in
        qpq-server-lite) echo qpq-server-lite ;;
        qpq) echo qpq-tui ;;
        qpq-demo) echo qpq-tests ;;
        *) cross_die "unknown binary '$1'; pass --package too" ;;
    esac
}

# Fails unless $1 is a statically linked ELF with no interpreter and no shared libraries.
cross_check_static() {
    local bin="$1"
    if readelf -lW "$bin" | grep -q 'INTERP'; then
        cross_die "$bin has an ELF interpreter (not static)"
    fi
    if readelf -dW "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
        cross_die "$bin needs shared libraries: $(readelf -dW "$bin" | grep NEEDED | tr -s ' ')"
    fi
    if readelf -SW "$bin" | grep -qE '\.symtab|\.debug_'; then
        cross_die "$bin is not stripped"
    fi
}

# Fails if a soft-float ARM binary ($T_FLOAT=soft) uses the hard-float calling convention.
# (ring's NEON assembly is present either way; ring only runs it where the CPU reports NEON.)
cross_check_float() {
    [ "$T_FLOAT" = soft ] || return 0
    if readelf -A "$1" | grep -q 'Tag_ABI_VFP_args: VFP registers'; then
        cross_die "$1 passes floats in VFP registers; arm_cortex-a9 routers have no FPU"
    fi
}
