# syntax=docker/dockerfile:1
# Godwit's image: the operator and the node daemon (agent and VMM).
#
# One image with both: godwit-node spawns godwit-vmm from next to itself, the
# three binaries share one build and one dependency tree, and the chart runs
# each component by its command (`godwit-operator`, `godwit-node`). A second
# image would save the operator only a few MB and double every pull and tag.
# The image's default user is non-root (the operator's); the chart's DaemonSet
# runs the node daemon privileged, as root, which it must be.
#
# Build: docker build -t ghcr.io/godwit-dev/godwit:0.1.0 .
#
# Build arguments, for builders that cannot pull (defaults are what users get):
# - RUST_IMAGE, BASE_IMAGE: the build and the runtime base images.
# - BINARIES=prebuilt takes the four binaries from the build context's `out/`
#   instead of compiling them (the `build` stage is then skipped). The local
#   cluster's container test builds its node image so, from the release
#   binaries the suite has just built, with a base image it makes with
#   debootstrap (e2e/podman/node-image.sh).
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The same build as e2e/test.sh (and so .ci/run).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p godwit-node -p godwit-operator -p godwit-cli --bins \
 && mkdir -p /out \
 && cp target/release/godwit-operator target/release/godwit-node target/release/godwit-vmm target/release/kubectl-godwit /out/

FROM scratch AS prebuilt
COPY out/ /out/

FROM ${BINARIES} AS binaries

FROM ${BASE_IMAGE}
# ca-certificates: template images fetched over https; iproute2 and procps:
# looking at a node's taps, bridges and VMM processes from `kubectl exec`;
# iptables: the agent's FORWARD rules for VM taps on br_netfilter nodes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 procps iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binaries /out/ /usr/local/bin/
# 65532: the conventional "nonroot" user; the chart sets the same.
RUN groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home nonroot
USER 65532:65532
EXPOSE 8080
ENTRYPOINT []
CMD ["godwit-operator"]
