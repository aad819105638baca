#!/usr/bin/env bash
# Builds the two container images from the repository root:
#   ${REGISTRY}/twosite:${TAG}        images/controller.Dockerfile (controller, CLI, witness)
#   ${REGISTRY}/twosite-agent:${TAG}  images/agent.Dockerfile (node agent)
# Needs a Docker engine with BuildKit (Docker 23+ has it by default); fails at once without one.
#
#   images/build.sh                      # ghcr.io/twosite/...:<workspace version>
#   REGISTRY=localhost:5000 TAG=dev images/build.sh
#   PUSH=1 images/build.sh               # and push them
#
# After the build it prints the base images' digests, to pin them with
# --build-arg RUST_IMAGE=...@sha256:... (see the Dockerfiles).
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY=${REGISTRY:-ghcr.io/twosite}
if [[ -z "${TAG:-}" ]]; then
  TAG=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
  [[ -n "$TAG" ]] || { echo "images/build.sh: no version in Cargo.toml; set TAG" >&2; exit 1; }
fi

if ! command -v docker >/dev/null 2>&1; then
  echo "images/build.sh: no docker command on this machine: the images cannot be built here" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "images/build.sh: docker cannot reach a Docker engine (docker info failed): the images cannot be built here" >&2
  exit 1
fi
export DOCKER_BUILDKIT=1

build() {
  local dockerfile=$1 image=$2
  echo "== docker build -f $dockerfile -t $image ."
  docker build --pull -f "$dockerfile" -t "$image" .
}

build images/controller.Dockerfile "$REGISTRY/twosite:$TAG"
build images/agent.Dockerfile "$REGISTRY/twosite-agent:$TAG"

# A smoke test of each image: the binary runs and prints its version.
docker run --rm "$REGISTRY/twosite:$TAG" --version
docker run --rm "$REGISTRY/twosite-agent:$TAG" --version
# The controller image must run as the non-root user the chart expects.
user=$(docker image inspect -f '{{.Config.User}}' "$REGISTRY/twosite:$TAG")
[[ "$user" == "65532:65532" ]] || { echo "images/build.sh: the controller image runs as '$user', not 65532:65532" >&2; exit 1; }

echo "== base image digests (pin them with --build-arg)"
for base in $(sed -n 's/^ARG \(RUST_IMAGE\|RUNTIME_IMAGE\)=//p' images/controller.Dockerfile images/agent.Dockerfile | sort -u); do
  docker pull -q "$base" >/dev/null
  echo "$base -> $(docker image inspect -f '{{join .RepoDigests " "}}' "$base")"
done

if [[ "${PUSH:-0}" == 1 ]]; then
  docker push "$REGISTRY/twosite:$TAG"
  docker push "$REGISTRY/twosite-agent:$TAG"
fi
echo "built $REGISTRY/twosite:$TAG and $REGISTRY/twosite-agent:$TAG"
