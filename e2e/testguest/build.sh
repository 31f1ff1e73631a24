#!/usr/bin/env bash
# Builds the Godwit test guest (cached by cargo) and fails if the binary holds an
# instruction this KVM cannot run in a guest: SSE/MMX/x87, XSAVE/XRSTOR, INT3.
# Prints the ELF's absolute path as the last line of stdout; everything else
# goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export CARGO_TARGET_DIR="$here/target"
# --target keeps these flags away from build scripts and proc-macros.
export RUSTFLAGS="-C target-feature=-sse,-sse2 -C relocation-model=static \
-C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-no-pie \
-C link-arg=-Wl,-T$here/linker.ld -C link-arg=-Wl,--build-id=none"
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
cargo build --quiet --release --locked --target x86_64-unknown-linux-gnu >&2
elf="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/godwit-testguest"

# One line per instruction: "<address>\t<mnemonic and operands>".
bad="$(objdump -d -M att --no-show-raw-insn "$elf" | awk -F'\t' '
    NF >= 2 && $1 ~ /^ *[0-9a-f]+:$/ {
        insn = $2
        n = split(insn, w, " ")
        m = w[1]
        if (m == "lock" || m == "rep" || m == "repz" || m == "repnz" || m == "data16" || m == "cs" || m == "ds" || m == "notrack" || m == "bnd") m = w[2]
        if (insn ~ /%[xyz]mm[0-9]|%mm[0-7]|%st(\(|$|,)/ ||
            m ~ /^f/ && m != "fs" ||
            m ~ /^(x?save|xsave.*|xrstor.*|fxsave.*|fxrstor.*|ldmxcsr|stmxcsr|emms|int3|wait)$/) {
            print $1 "\t" insn
        }
    }')"
if [ -n "$bad" ]; then
    echo "build.sh: $elf contains instructions this KVM cannot run in a guest:" >&2
    echo "$bad" | head -20 >&2
    exit 1
fi
echo "$elf"
