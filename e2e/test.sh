#!/usr/bin/env bash
# The whole test suite: formatting, lints, the test guest build, and every test
# of the workspace (unit, integration with real KVM guests, end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

bash e2e/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if [ -x e2e/testguest/build.sh ] || [ -f e2e/testguest/build.sh ]; then
  bash e2e/testguest/build.sh >/dev/null
fi
# The e2e tests and the demo run the Godwit binaries (VMM, node agent, operator).
cargo build --release -p godwit-node -p godwit-operator -p godwit-cli --bins
cargo test --workspace --release
