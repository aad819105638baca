# syntax=docker/dockerfile:1.7
# The node agent `twosite-agent`. It runs as root in a privileged pod (the watchdog device, the
# workload stop), so its base has what those need: `sh` for --stop-command, `modprobe` (kmod)
# for loading softdog when the host has no watchdog device and /lib/modules is mounted, and
# CA certificates for the witness. Build from the repository root (images/build.sh does):
#   docker build -f images/agent.Dockerfile -t ghcr.io/twosite/twosite-agent:0.1.0 .
#
# Bases are pinned by version; pass `--build-arg RUST_IMAGE=...@sha256:...` (and RUNTIME_IMAGE)
# to pin digests too: images/build.sh prints the digests it built from.
ARG RUST_IMAGE=rust:1.95.0-slim-trixie
ARG RUNTIME_IMAGE=debian:trixie-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY node-health node-health
COPY controller controller
COPY witness witness
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=twosite-target,sharing=locked \
    cargo build --release --locked -p twosite-node-health --features agent --bin twosite-agent \
 && install -D -m 0755 target/release/twosite-agent /out/twosite-agent

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates kmod \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/twosite-agent /usr/local/bin/twosite-agent
# Root: the agent opens /dev/watchdog and stops workloads on the node (the DaemonSet is
# privileged and says runAsUser: 0).
USER 0:0
EXPOSE 9477
ENTRYPOINT ["/usr/local/bin/twosite-agent"]
