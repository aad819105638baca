# syntax=docker/dockerfile:1.7
# The `twosite` binary (controller, CLI, witness) on a distroless base, as a non-root user.
# Build from the repository root (images/build.sh does):
#   docker build -f images/controller.Dockerfile -t ghcr.io/twosite/twosite:0.1.0 .
#
# Bases are pinned by version; pass `--build-arg RUST_IMAGE=rust:1.95.0-slim-trixie@sha256:...`
# (and RUNTIME_IMAGE) to pin digests too: images/build.sh prints the digests it built from.
# Builder and runtime are both Debian 13 (trixie), so the binary's glibc matches.
ARG RUST_IMAGE=rust:1.95.0-slim-trixie
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian13:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Only what the workspace needs to build (images/controller.Dockerfile.dockerignore keeps
# target/ and .git out of the context).
COPY Cargo.toml Cargo.lock ./
COPY node-health node-health
COPY controller controller
COPY witness witness
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=twosite-target,sharing=locked \
    cargo build --release --locked -p twosite-controller --bin twosite \
 && install -D -m 0755 target/release/twosite /out/twosite

FROM ${RUNTIME_IMAGE}
# distroless/cc: glibc, libgcc, CA certificates (the witness client's trusted roots), no shell.
COPY --from=build /out/twosite /usr/local/bin/twosite
# 65532 is distroless's `nonroot`; the chart's runAsUser and fsGroup say the same.
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["/usr/local/bin/twosite"]
CMD ["--help"]
