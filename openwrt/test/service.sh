#!/usr/bin/env bash
# Runs the installed init script's start_service + service_triggers inside a scratch root
# (chroot, busybox ash as on OpenWrt) and prints what procd would be told (see rc-shim.sh).
#
#   openwrt/test/service.sh ROOT
#
# Needs root (chroot) and a static busybox (Debian busybox-static); it copies busybox into
# ROOT/bin once. The init script runs for real: it reads ROOT/etc/config/qpq, creates and
# chowns the data directory as the service user from ROOT/etc/passwd.
set -euo pipefail

root="${1:?usage: service.sh ROOT}"
here="$(cd "$(dirname "$0")" && pwd)"
[ "$(id -u)" = 0 ] || { echo "service.sh: needs root for chroot" >&2; exit 1; }
busybox="$(command -v busybox || true)"
[ -n "$busybox" ] && file -L "$busybox" | grep -q 'statically linked' ||
    { echo "service.sh: needs a static busybox (apt-get install busybox-static)" >&2; exit 1; }

if [ ! -x "$root/bin/sh" ]; then
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" "$root/tmp" "$root/var/run"
    cp "$busybox" "$root/bin/busybox"
    chroot "$root" /bin/busybox --install -s /bin
fi
cp "$here/rc-shim.sh" "$root/tmp/rc-shim.sh"

exec chroot "$root" /bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin /bin/sh -c \
    '. /tmp/rc-shim.sh && . /etc/init.d/qpq-server-lite && rc_shim_start'

