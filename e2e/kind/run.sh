#!/usr/bin/env bash
# Godwit on a kind cluster: build the image, create a cluster with two VM
# hosts, install the chart, run the example VM, migrate it live, and check
# that the VM runs and the migration succeeded. Needs docker, kind, kubectl,
# helm and /dev/kvm (nested KVM when this machine is a VM).
# KEEP=1 leaves the cluster up; delete it with `kind delete cluster --name godwit`.
set -euo pipefail
cd "$(dirname "$0")/../.."

image=godwit:kind
cluster=godwit
export KUBECONFIG="${KUBECONFIG:-$PWD/target/kind-kubeconfig}"
mkdir -p target

cleanup() { [ "${KEEP:-}" = 1 ] || kind delete cluster --name "$cluster"; }
trap cleanup EXIT

echo "==> image and test guest"
docker build -t "$image" .
guest=$(bash e2e/testguest/build.sh | tail -1)

echo "==> kind cluster"
kind create cluster --config e2e/kind/cluster.yaml --kubeconfig "$KUBECONFIG"
kind load docker-image "$image" --name "$cluster"

# What the examples expect on a VM host: the guest, a root image and the
# bridge godwit0 with the examples' gateway address.
workers=$(kind get nodes --name "$cluster" | grep worker)
for node in $workers; do
  docker exec "$node" mkdir -p /var/lib/godwit/kernels /var/lib/godwit/images
  docker cp "$guest" "$node:/var/lib/godwit/kernels/godwit-testguest.elf"
  docker exec "$node" truncate -s 64M /var/lib/godwit/images/testguest-root.raw
  docker exec "$node" sh -c 'ip link add godwit0 type bridge && ip link set godwit0 address "$(cat /sys/class/net/godwit0/address)" && ip addr add 10.88.0.1/24 dev godwit0 && ip link set godwit0 up'
  kubectl label node "$node" godwit.dev/vm-host=true
done

echo "==> helm install"
helm install godwit charts/godwit --namespace godwit-system --create-namespace \
  --set image.repository=godwit --set image.tag=kind --set image.pullPolicy=Never \
  --wait --timeout 5m

echo "==> VM"
kubectl apply -f examples/template.yaml -f examples/vm.yaml
kubectl wait vm/demo --for=jsonpath='{.status.phase}'=Running --timeout=3m
source=$(kubectl get gvm demo -o jsonpath='{.status.nodeName}')

echo "==> live migration from $source"
kubectl apply -f examples/migration.yaml
kubectl wait vmmigration/demo-move --for=jsonpath='{.status.phase}'=Succeeded --timeout=5m
kubectl wait vm/demo --for=jsonpath='{.status.phase}'=Running --timeout=1m
target=$(kubectl get gvm demo -o jsonpath='{.status.nodeName}')
[ "$target" != "$source" ] || { echo "the VM did not move off $source" >&2; exit 1; }

kubectl get gvm,gvmm -o wide
echo "ok: VM demo runs on $target, moved live from $source"
