#!/usr/bin/env bash
# Build the training image and run the offline demo inside it (`make docker-check`).
#
# With a working Docker engine: docker build, then docker run of the demo.
# Without one (CI sandboxes, this project's build machine): podman builds the
# same Dockerfile with chroot isolation, which needs no daemon and no user
# namespaces, and buildah runs the demo in the image's root filesystem (on
# such machines `podman run` fails while `buildah run --isolation chroot` works).
# Registries may be unreachable there too, so the base image is then made
# locally: Debian bookworm by debootstrap, whose python3 is 3.11 like the
# pinned python:3.11.7-slim-bookworm, with a venv on PATH standing in for the
# official image's writable site-packages.
#
# Not part of `make test`: it downloads and installs the pinned torch with its
# CUDA libraries (about 3 GB of wheels, 6 GB unpacked) and takes many minutes.
#
# Environment:
#   IMAGE           tag to build (default repro-cifar:check)
#   ENGINE          docker or podman (default: docker if its daemon answers)
#   PIP_EXTRA_ARGS  passed to the image's pip (a mirror, local wheels)
#   BUILD_VOLUMES   extra -v SRC:DST[:ro] for the podman build (podman only), space-separated,
#                   e.g. to let PIP_EXTRA_ARGS point at a local wheel folder
#   WORK            scratch folder for the debootstrap base and the demo output
#   GIT_COMMIT      recorded as the image's revision label (default: HEAD, with
#                   -dirty when the working tree has uncommitted changes)
#
# Behind a TLS-intercepting proxy the image's pip does not trust the proxy's CA,
# which the host's bundle has; lend it to the build (as on this project's machine):
#   BUILD_VOLUMES=/etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro \
#   PIP_EXTRA_ARGS="--cert /etc/host-ca.crt" make docker-check
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-repro-cifar:check}
PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}
BUILD_VOLUMES=${BUILD_VOLUMES:-}
WORK=${WORK:-/var/tmp/repro-docker-check}
LOCAL_BASE=localhost/repro-base:bookworm-py311
# The build context is the working tree, as for `docker build .`: say so in the
# label when it is not exactly the commit.
if [[ -z "${GIT_COMMIT:-}" ]]; then
    GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then GIT_COMMIT+=-dirty; fi
fi

# The demo of `make demo`, through the image's own entry point (accelerate).
DEMO=(accelerate launch train.py --config configs/demo.yaml --output-dir /runs/demo --overwrite)

# The demo's output lands here, on the host; uid 1000 (the image's user) writes it.
OUT=$WORK/runs
mkdir -p "$OUT"
chmod 0777 "$OUT"
rm -rf "$OUT/demo"

log() { printf '\n== %s: %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ -z "${ENGINE:-}" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null; then
        ENGINE=podman
    else
        echo "docker_check.sh: neither a Docker engine nor podman is available" >&2
        exit 1
    fi
fi

make_local_base() {
    # Only when the base cannot be pulled: a minimal Debian bookworm with python3
    # (3.11) and a venv at /opt/venv first on PATH, so `pip install` works as in
    # the official python image (bookworm's system Python refuses it, PEP 668).
    if podman image exists "$LOCAL_BASE"; then
        log "reusing local base $LOCAL_BASE"
        return
    fi
    local rootfs=$WORK/rootfs
    log "debootstrap Debian bookworm into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian
    chroot "$rootfs" python3 -m venv /opt/venv
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "import it as $LOCAL_BASE"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$LOCAL_BASE"
}

print_manifest() {
    python3 - "$1" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
env = m["environment"]
print(f"manifest: world_size={m['world_size']} test_accuracy={m['test_accuracy']:.4f} "
      f"python_hash_seed={m['python_hash_seed']} "
      f"cublas_workspace_config={m['determinism']['cublas_workspace_config']}")
print(f"          python={env['python']} torch={env['torch']} device={env['device']}")
print(f"          weights_sha256={m['weights_sha256']}")
EOF
}

case "$ENGINE" in
docker)
    log "docker build -t $IMAGE"
    docker build -t "$IMAGE" --build-arg GIT_COMMIT="$GIT_COMMIT" \
        --build-arg PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS" .
    log "docker run: the demo"
    docker run --rm -v "$OUT:/runs" "$IMAGE" "${DEMO[@]}"
    ;;
podman)
    base_args=()
    if ! podman pull --quiet python:3.11.7-slim-bookworm >/dev/null 2>&1; then
        make_local_base
        base_args=(--build-arg BASE_IMAGE="$LOCAL_BASE")
    fi
    volumes=()
    for volume in $BUILD_VOLUMES; do volumes+=(--volume "$volume"); done
    log "podman build --isolation chroot -t $IMAGE ${base_args[*]}"
    podman build --isolation chroot --pull=never -t "$IMAGE" "${base_args[@]}" "${volumes[@]}" \
        --build-arg GIT_COMMIT="$GIT_COMMIT" --build-arg PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS" .
    podman image inspect --format 'image: user={{.Config.User}} cmd={{.Config.Cmd}} size={{.Size}}' "$IMAGE"
    log "buildah run --isolation chroot: the demo"
    container=$(buildah from --pull-never "$IMAGE")
    trap 'buildah rm "$container" >/dev/null' EXIT
    buildah run --isolation chroot --user 1000:1000 --volume "$OUT:/runs" "$container" -- "${DEMO[@]}"
    ;;
*)
    echo "docker_check.sh: ENGINE must be docker or podman, not $ENGINE" >&2
    exit 2
    ;;
esac

log "the demo's run folder, written inside the image: $OUT/demo"
print_manifest "$OUT/demo/manifest.json"
