#!/usr/bin/env bash
# A stock distribution cloud image on Godwit, the way a platform team's first
# VM looks: Debian 12's genericcloud image as a template with
# `boot: {fromImage: {}}` (the agent boots the kernel and initrd from the
# image's own /boot), customization through cloud-init NoCloud (hostname,
# static address, an SSH key), then an SSH login that checks `hostname`, the
# address and `lsblk`, a live migration to the other node with a second login,
# and a graceful stop (ACPI power button, guest powers off).
#
# For a machine with hardware virtualization (Intel VT-x or AMD-V, bare metal
# or a VM whose hypervisor runs nested guests at full speed). The development
# machine of this repository cannot run a stock Linux kernel (see README,
# "Guests"), so this script is what users run; the suite checks each part of
# it with the test guest and independent oracles instead.
#
# Usage, as root on Debian 12 or Ubuntu 22.04+, from the repository:
#   bash e2e/linux/run.sh
# Environment:
#   IMAGE=path.qcow2   use this image instead of downloading Debian's
#   IMAGE_URL=...      another cloud image URL (qcow2; Debian or Ubuntu)
#   KEEP=1             leave the cluster and the VM up at the end (Ctrl-C the
#                      godwit-local process, pid printed, to tear it down)
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE_URL=${IMAGE_URL:-https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2}
work=${WORK:-/var/tmp/godwit-linux}
dir=/tmp/godwit-local
vm_ip=10.88.0.50
vm_name=linux-1
mkdir -p "$work"

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "==> $*"; }

step "preflight"
[ "$(id -u)" = 0 ] || fail "run as root (network namespaces, /dev/kvm)"
[ -c /dev/kvm ] || fail "/dev/kvm is missing: enable VT-x/AMD-V (or nested virtualization) and load kvm_intel/kvm_amd"
grep -qE '\b(vmx|svm)\b' /proc/cpuinfo || fail "this CPU does not offer VT-x or AMD-V"
for tool in kubectl ssh ssh-keygen qemu-img curl; do
  command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install openssh-client qemu-utils curl; kubectl: see e2e/install-deps.sh)"
done

step "build"
bash e2e/install-deps.sh >/dev/null
bash e2e/testguest/build.sh >/dev/null
cargo build --release -p godwit-node -p godwit-operator -p godwit-cli --bins \
  -p godwit-e2e --bin godwit-local
export PATH=$PWD/target/release:$PATH

step "image"
if [ -z "${IMAGE:-}" ]; then
  IMAGE=$work/$(basename "$IMAGE_URL")
  if [ ! -s "$IMAGE" ]; then
    curl -fL --retry 3 -o "$IMAGE.part" "$IMAGE_URL" || fail "could not download $IMAGE_URL"
    mv -f "$IMAGE.part" "$IMAGE"
  fi
fi
qemu-img info "$IMAGE" | grep -q 'file format: qcow2' || fail "$IMAGE is not a qcow2 image"
sha=$(sha256sum "$IMAGE" | cut -d' ' -f1)
echo "$IMAGE sha256 $sha"

step "SSH key"
key=$work/id_ed25519
[ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -f "$key"
pub=$(cat "$key.pub")

step "local cluster (2 nodes)"
rm -rf "$dir"
godwit-local up --nodes 2 --dir "$dir" >"$work/cluster.log" 2>&1 &
cluster_pid=$!
cleanup() {
  if [ "${KEEP:-}" = 1 ]; then
    echo "KEEP=1: cluster left up (godwit-local pid $cluster_pid; kill -INT it to tear down)"
  else
    kill -INT "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
for _ in $(seq 1 240); do
  grep -q '^Local cluster up' "$work/cluster.log" && break
  kill -0 "$cluster_pid" 2>/dev/null || { cat "$work/cluster.log" >&2; fail "godwit-local exited"; }
  sleep 0.5
done
grep -q '^Local cluster up' "$work/cluster.log" || fail "the local cluster did not come up in 2 minutes"
export KUBECONFIG=$dir/kubeconfig
client=$(cat "$dir/client-netns")
in_client() { ip netns exec "$client" "$@"; }
ssh_vm() {
  in_client ssh -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    -o ConnectTimeout=5 -o BatchMode=yes "debian@$vm_ip" "$@"
}

step "template (fromImage) and VM (cloud-init NoCloud)"
kubectl apply -f - <<EOF
apiVersion: godwit.dev/v1alpha1
kind: VMTemplate
metadata:
  name: debian-12
  namespace: default
spec:
  image:
    source: $IMAGE
    sha256: $sha
    format: qcow2
  boot:
    fromImage: {}
    cmdline: console=ttyS0
  cpu: 2
  memory: 1Gi
  networks:
    - name: net0
      bridge: godwit0
---
apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: $vm_name
  namespace: default
spec:
  templateRef:
    name: debian-12
  disks:
    - name: root
      source:
        template: {}
      storage: Shared
  runStrategy: Always
  evictionStrategy: LiveMigrate
  terminationGracePeriodSeconds: 60
  customization:
    hostname: $vm_name
    network:
      address: $vm_ip/24
      gateway: 10.88.0.1
    sshAuthorizedKeys:
      - "$pub"
EOF
kubectl wait "vm/$vm_name" --for=jsonpath='{.status.phase}'=Running --timeout=5m
node=$(kubectl get gvm "$vm_name" -o jsonpath='{.status.nodeName}')
console=$dir/nodes/$node/vms/default/$vm_name/console.log
echo "running on $node; console: $console"

login_and_check() {
  step "SSH login ($1)"
  local ok=
  for _ in $(seq 1 60); do
    if ssh_vm true 2>/dev/null; then ok=1; break; fi
    sleep 5
  done
  [ -n "$ok" ] || { tail -n 40 "$console" >&2 || true; fail "no SSH login to $vm_ip within 5 minutes"; }
  local host addr disks
  host=$(ssh_vm hostname)
  addr=$(ssh_vm ip -4 -o addr show)
  disks=$(ssh_vm lsblk -n -o NAME,SIZE,RO,LABEL,MOUNTPOINT)
  echo "hostname: $host"; echo "$addr"; echo "$disks"
  [ "$host" = "$vm_name" ] || fail "hostname is '$host', not $vm_name (cloud-init meta-data)"
  grep -q "inet $vm_ip/24" <<<"$addr" || fail "the guest does not have $vm_ip/24 (cloud-init network-config)"
  grep -qE '^vda .* /$|^vda' <<<"$disks" || fail "no root disk vda in lsblk"
  grep -qi 'cidata' <<<"$disks" || fail "the NoCloud seed (label cidata) is not in lsblk"
}
login_and_check "on $node"

step "live migration"
kubectl apply -f - <<EOF
apiVersion: godwit.dev/v1alpha1
kind: VMMigration
metadata:
  name: $vm_name-move
  namespace: default
spec:
  vmName: $vm_name
EOF
kubectl wait "vmmigration/$vm_name-move" --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m
target=$(kubectl get gvm "$vm_name" -o jsonpath='{.status.nodeName}')
[ "$target" != "$node" ] || fail "the VM did not move off $node"
kubectl get vmmigration "$vm_name-move" -o jsonpath='{.status.result}'; echo
console=$dir/nodes/$target/vms/default/$vm_name/console.log
login_and_check "on $target after the migration"

step "graceful stop (power button)"
started=$(date +%s)
kubectl-godwit stop "$vm_name"
kubectl wait "vm/$vm_name" --for=jsonpath='{.status.phase}'=Stopped --timeout=2m
echo "stopped in $(( $(date +%s) - started )) s"
vmm_log=$dir/nodes/$target/vms/default/$vm_name/vmm.log
grep -q 'guest powered off (ACPI S5)' "$vmm_log" \
  || fail "the guest did not power off by itself (see $vmm_log)"

echo "ok: $IMAGE booted its own kernel, configured itself from the NoCloud seed, moved live from $node to $target and powered off on the button"
