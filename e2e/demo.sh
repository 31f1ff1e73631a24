#!/usr/bin/env bash
# The main job: Godwit's local demo on this machine. It builds the test guest,
# the VMM and the demo driver, then boots the guest on one simulated node
# (a network namespace), connects a TCP client, live-migrates the VM to another
# node while printing the progress, and checks the result. Needs root and
# /dev/kvm. `--json` prints one JSON line at the end instead of the story.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/install-deps.sh >/dev/null
echo "==> Building (release): test guest, godwit-vmm, godwit-local"
bash e2e/testguest/build.sh >/dev/null
cargo build --release -q -p godwit-node --bin godwit-vmm -p godwit-e2e --bin godwit-local
exec target/release/godwit-local demo "$@"
