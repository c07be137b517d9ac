# syntax=docker/dockerfile:1
# The ferrovol image: the ferrovol binary for both roles of deploy/ (the controller
# StatefulSet and the node DaemonSet) with the filesystem and LVM tools the node plugin runs,
# and ferrovol-mounter, the S3 family's FUSE mounter (its own DaemonSet in
# deploy/overlays/s3), with fuse3.
#   docker build -t REGISTRY/ferrovol:0.1.0 .
# Linted by scripts/check-deploy (hadolint, checkov); no Docker engine builds it in CI.
#
# Base images are pinned by tag. For reproducible builds pin them by digest as well, e.g.
#   FROM rust:1.95.0-bookworm@sha256:<digest>   (docker buildx imagetools inspect <image>)
# and bump both together.

# The toolchain CI builds with (the workspace needs rustc 1.88 or newer), on the same
# Debian release as the runtime image, so the binary's glibc needs are met there.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches persist between builds (BuildKit); the binaries are copied
# out of the cache mount to a plain directory for the next stage.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferrovol -p ferrovol-mounter \
    && install -D -m 0755 target/release/ferrovol /out/ferrovol \
    && install -D -m 0755 target/release/ferrovol-mounter /out/ferrovol-mounter

FROM debian:12.11-slim
# What the node plugin runs: mkfs.ext4, resize2fs, e2fsck (e2fsprogs); mkfs.xfs, xfs_growfs
# (xfsprogs); lvm (lvm2) with thin_check, which lvm runs to activate a thin pool
# (thin-provisioning-tools); util-linux. What the S3 mounter runs: fusermount3 (fuse3).
# ca-certificates: the controller and the mounter verify https:// S3 endpoints against the
# system's CA certificates (rustls-native-certs reads /etc/ssl/certs; SSL_CERT_FILE points
# it at a private CA's bundle instead).
# Package versions are not pinned: they are those of the pinned Debian point release plus
# its security updates, and an exact version pin breaks the build as soon as the archive
# replaces that version with a fixed one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        e2fsprogs \
        fuse3 \
        lvm2 \
        thin-provisioning-tools \
        util-linux \
        xfsprogs \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-log-init --no-create-home --uid 65532 --user-group \
        --shell /usr/sbin/nologin ferrovol
COPY --from=build /out/ferrovol /out/ferrovol-mounter /usr/local/bin/
LABEL org.opencontainers.image.title="ferrovol" \
      org.opencontainers.image.description="Kubernetes CSI driver: loop, lvm, lvm-thin and s3 volumes (with the S3 FUSE mounter)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# Non-root by default: the controller runs as this user with a read-only root filesystem.
# The node plugin needs root (loop devices, mkfs, lvm, mounts for the kubelet) and its
# DaemonSet sets runAsUser: 0 and privileged explicitly (deploy/base/node.yaml), as does the
# mounter's (/dev/fuse, mounts: deploy/overlays/s3/mounter.yaml, which runs
# /usr/local/bin/ferrovol-mounter as its command); one image serves every role, and the
# safer default is the one a pod gets without asking.
USER 65532:65532
# No HEALTHCHECK: Kubernetes ignores it, and one command cannot check every role (they
# serve different services on sockets whose path the manifests choose). The pods' health is
# the livenessprobe sidecar calling CSI Probe (deploy/base), and the mounter's socket.
# checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; the livenessprobe sidecar checks the driver
ENTRYPOINT ["/usr/local/bin/ferrovol"]
CMD ["--help"]
