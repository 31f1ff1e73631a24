#!/usr/bin/env bash
# The main job: Godwit's local demo on this machine. It builds the test guest
# and Godwit (VMM, node agent, operator, local-cluster driver), brings up a
# local cluster (API test server, two nodes as network namespaces, the
# operator, a node agent per node), applies the example template and VM with
# kubectl, connects a TCP client to the guest, applies the example
# VMMigration, prints its progress from its status, and checks the result.
# Needs root and /dev/kvm. `--json` prints one JSON line at the end instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/install-deps.sh >/dev/null
echo "==> Building (release): test guest, godwit-vmm, godwit-node, godwit-operator, godwit-local" >&2
bash e2e/testguest/build.sh >/dev/null
cargo build --release -q -p godwit-node -p godwit-operator --bins -p godwit-e2e --bin godwit-local
exec target/release/godwit-local demo "$@"
