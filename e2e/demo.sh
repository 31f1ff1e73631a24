#!/usr/bin/env bash
# The main job: a local demo of Godwit on this machine. It grows with the project
# (see README); today it generates the CRDs and validates the example manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash e2e/install-deps.sh
cargo run -q -p godwit-crds --bin crdgen
cargo test -q -p godwit-crds --test manifests
