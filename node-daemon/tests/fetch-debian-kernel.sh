#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-*-cloud-amd64) with `apt-get
# download` and extracts its bzImage with `dpkg-deb -x` into a cache dir (it
# is not installed into /boot). Prints the bzImage's path as the last line of
# stdout; everything else goes to stderr. Cached after the first run.
set -euo pipefail
cache="${GODWIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/godwit}/debian-kernel"
mkdir -p "$cache"
existing="$(ls "$cache"/root/boot/vmlinuz-*-cloud-amd64 2>/dev/null | head -1 || true)"
if [ -n "$existing" ]; then
    echo "$existing"
    exit 0
fi
resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
pkg="$(resolve)"
if [ -z "$pkg" ]; then
    apt-get update >&2
    pkg="$(resolve)"
fi
[ -n "$pkg" ] || { echo "fetch-debian-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
cd "$cache"
rm -f ./*.deb
apt-get download "$pkg" >&2 || { apt-get update >&2; apt-get download "$pkg" >&2; }
deb="$(ls ./*.deb | head -1)"
rm -rf root
dpkg-deb -x "$deb" root
rm -f "$deb"
k="$(ls "$cache"/root/boot/vmlinuz-*-cloud-amd64 | head -1)"
[ -n "$k" ] || { echo "fetch-debian-kernel: no vmlinuz in $pkg" >&2; exit 1; }
echo "$k"
