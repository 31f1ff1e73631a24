#!/usr/bin/env bash
# Builds Godwit's image with Podman from the repo's Dockerfile, for the local
# cluster's agents in containers (e2e/tests/agent_container.rs), on a machine
# that cannot pull from a registry:
# - the runtime base is made here with debootstrap (Debian bookworm, minbase)
#   and `podman import`ed once as localhost/godwit-e2e-base:bookworm;
# - the binaries are the release binaries already built in target/release
#   (the Dockerfile's BINARIES=prebuilt stage), so the image holds exactly
#   what the suite tests; users build from source with the defaults.
# Usage: e2e/podman/node-image.sh [TAG]
#   (default localhost/godwit:e2e-<checkout>, <checkout> a hash of this
#   checkout's path: two checkouts on one machine, e.g. git worktrees, test
#   their own binaries, never each other's)
# Prints the tag. Needs podman, runc and debootstrap (e2e/install-deps.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tag=${1:-localhost/godwit:e2e-$(printf %s "$root" | sha256sum | cut -c1-12)}
base=localhost/godwit-e2e-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# This sandbox refuses larger limits than these; runc, not crun, which
# refuses this host's hybrid cgroups.
podman_opts=(--runtime runc)
limits=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing: run e2e/install-deps.sh" >&2; exit 1; }
done
for bin in godwit-node godwit-vmm godwit-operator kubectl-godwit; do
  [ -x "$root/target/release/$bin" ] || {
    echo "$0: target/release/$bin is missing: cargo build --release -p godwit-node -p godwit-operator -p godwit-cli --bins" >&2
    exit 1
  }
done

# One build at a time on this machine (test binaries run in parallel).
exec 9>/var/tmp/godwit-e2e-podman.lock
flock 9

work=$(mktemp -d /var/tmp/godwit-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
if ! podman "${podman_opts[@]}" image exists "$base"; then
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    echo "$0: debootstrap of the base image failed (mirror $mirror; set DEBIAN_MIRROR)" >&2
    exit 1
  }
  tar -C "$work/rootfs" -c . | podman "${podman_opts[@]}" import - "$base" >/dev/null
  rm -rf "$work/rootfs"
fi
mkdir -p "$work/context/out"
for bin in godwit-node godwit-vmm godwit-operator kubectl-godwit; do
  cp "$root/target/release/$bin" "$work/context/out/"
  # The release profile keeps debug info; the image need not.
  if command -v strip >/dev/null; then strip --strip-debug "$work/context/out/$bin"; fi
done
podman "${podman_opts[@]}" build "${limits[@]}" -q \
  -f "$root/Dockerfile" \
  --build-arg BINARIES=prebuilt \
  --build-arg BASE_IMAGE="$base" \
  -t "$tag" "$work/context" >/dev/null
# The image this tag named before is left untagged: remove it.
podman "${podman_opts[@]}" image prune -f >/dev/null
echo "$tag"
