#!/usr/bin/env bash
# Installs what Godwit's build, tests and demo need on a fresh Debian 12 machine
# (run as root). Idempotent: installs only what is missing.
set -euo pipefail

apt_packages=(
  qemu-system-x86   # the oracle and benchmark peer for the test guest
  qemu-utils        # qemu-img: the checker of every image we write
  iproute2          # ip netns, veth, bridges, taps; tc tbf for link shaping
  binutils          # objdump, as: the test guest build refuses SSE/x87 code
  iputils-ping      # ping from a client namespace to the guest
  kmod              # modprobe tun/bridge where they are modules
  acpica-tools      # iasl: disassembles the ACPI tables our VMM builds
  mtools            # mdir/mcopy: read the NoCloud seed image back
  dosfstools        # fsck.fat: checks the NoCloud seed image
  cloud-init        # cloud-init schema / net-convert: check the seed's user-data and network-config
  e2fsprogs         # mkfs.ext4 -d, blkid: build and check the fromImage test disks
  fdisk             # sfdisk: partition tables (GPT and MBR) for the fromImage test disks
  podman            # node agents in real containers (e2e/tests/agent_container.rs)
  runc              # podman's runtime here: crun refuses this host's hybrid cgroups
  debootstrap       # the local base image of the node image (e2e/podman/node-image.sh)
  iptables          # node namespaces run with FORWARD DROP; the agent adds its rules (nft backend)
  procps            # sysctl: br_netfilter on in each node namespace
  zstd              # measures how the test guest's text-like pages compress (testguest_workload)
)

# kubectl: the machine image may bring a newer one; Debian's is the fallback.
command -v kubectl >/dev/null || apt_packages+=(kubernetes-client)

missing_packages() {
  missing=()
  for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
}
# Twice: installing one package can remove another that was there (seen: the
# machine image's backported qemu-utils goes when Debian's qemu-system-x86
# comes in), so what is missing after the first round is installed again.
export DEBIAN_FRONTEND=noninteractive
updated=no
for round in 1 2; do
  missing_packages
  [ "${#missing[@]}" -eq 0 ] && break
  echo "install-deps: installing ${missing[*]} (round $round)"
  [ "$updated" = yes ] || { apt-get update -qq; updated=yes; }
  apt-get install -y -qq "${missing[@]}"
done
missing_packages
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: still missing after installing: ${missing[*]}" >&2
  exit 1
fi
for tool in qemu-img qemu-system-x86_64 iasl mcopy fsck.fat cloud-init mkfs.ext4 sfdisk podman runc debootstrap iptables; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool is missing after installing its package" >&2; exit 1; }
done

for tool in cargo rustc; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool not found: install Rust (rustup) first" >&2; exit 1; }
done
# Helm's Go SDK as a Python package: the chart tests (e2e/tests/chart.rs,
# e2e/tests/rbac.rs) drive real Helm through e2e/helm/chart.py, no helm binary.
python3 -c "import helm_python" 2>/dev/null \
  || python3 -m pip install --quiet --break-system-packages helm-python-sdk

rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt

[ -e /dev/kvm ] || echo "install-deps: warning: /dev/kvm is missing; the KVM tests will fail" >&2
[ -e /dev/net/tun ] || { mkdir -p /dev/net; mknod /dev/net/tun c 10 200 2>/dev/null || true; }
echo "install-deps: ok"
