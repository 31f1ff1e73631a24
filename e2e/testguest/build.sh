#!/usr/bin/env bash
# Builds the Godwit test guest (cached by cargo) and fails if the binary holds an
# instruction this KVM cannot run in a guest: SSE/MMX/x87, XSAVE/XRSTOR, INT3.
# Prints the ELF's absolute path as the last line of stdout; everything else
# goes to stderr. `build.sh --scan FILE` only runs the instruction scan on FILE.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Prints "<address>\t<instruction>" for every forbidden instruction in $1.
forbidden_instructions() {
    objdump -d -M att --no-show-raw-insn "$1" | awk -F'\t' '
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
    }'
}

check() {
    local bad
    bad="$(forbidden_instructions "$1")"
    if [ -n "$bad" ]; then
        echo "build.sh: $1 contains instructions this KVM cannot run in a guest:" >&2
        echo "$bad" | head -20 >&2
        return 1
    fi
}

if [ "${1:-}" = "--scan" ]; then
    check "$2"
    exit
fi

cd "$here"
export CARGO_TARGET_DIR="$here/target"
# --target keeps these flags away from build scripts and proc-macros.
export RUSTFLAGS="-C target-feature=-sse,-sse2 -C relocation-model=static \
-C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-no-pie \
-C link-arg=-Wl,-T$here/linker.ld -C link-arg=-Wl,--build-id=none"
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
cargo build --quiet --release --locked --target x86_64-unknown-linux-gnu >&2
elf="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/godwit-testguest"

check "$elf"
echo "$elf"
