# syntax=docker/dockerfile:1
#
# sessionizer as a small runtime image (multi-stage; needs BuildKit, the default builder of
# Docker 23 and later, for the cache mounts):
#
#   docker build -t sessionizer:0.1.0 .
#   docker run --rm sessionizer:0.1.0 --version
#
# A cold build compiles DataFusion, delta-rs and the AWS SDK in release mode: about 31 minutes
# on 2 cores (README, "Two commands"). Rebuilds after a change under src/ reuse the
# dependency layer below and compile only this crate.
#
# Kubernetes manifests that run this image: scripts/k8s/ (README there).

# Keep in step with the channel in rust-toolchain.toml (1.95.0): the build runs with that
# file present, so a different image toolchain would make rustup download 1.95.0 instead.
ARG RUST_VERSION=1.95.0

# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS builder

# What the build needs beyond Rust is a C compiler and libc headers: mimalloc, zstd, liblzma,
# ring and aws-lc (rustls' crypto) are C compiled by the `cc` crate. The slim image ships gcc
# and libc6-dev already; they are named here so that the requirement is written down.
# Deliberately not installed:
#   - libssl-dev / pkg-config: nothing links OpenSSL (no openssl-sys in Cargo.lock; TLS is
#     rustls, with certificates from the system store at run time). Without pkg-config,
#     liblzma-sys and zstd-sys always build their bundled copies, so the binary links only
#     glibc (libc, libm, libgcc_s) and runs on any bookworm-or-newer base.
#   - cmake / clang: aws-lc-sys 0.47 builds with its `cc` builder and pregenerated bindings on
#     x86_64 and aarch64 Linux (glibc); cmake would only be needed for FIPS or other targets.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

WORKDIR /src

# 1. Dependencies only, as their own layer: the manifests and stand-in sources. This layer is
#    rebuilt only when Cargo.toml, Cargo.lock or rust-toolchain.toml change. The bench stub
#    exists because Cargo.toml declares `[[bench]] engine`, and cargo refuses a manifest whose
#    declared target file is missing (benches are not built by `cargo build`).
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/engine.rs
# The crate registry is a BuildKit cache mount: downloads survive between builds without
# being stored in a layer. --locked: exactly the versions in Cargo.lock, or fail.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release --locked

# 2. The crate itself. COPY keeps the files' modification times from the build context, which
#    can be older than the stand-in build above; the touch makes cargo see the real sources as
#    changed, so the stand-in binary is never shipped.
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/sessionizer /out/sessionizer \
    && /out/sessionizer --version

# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: the S3 clients use rustls with the system's certificate store
# (rustls-native-certs reads /etc/ssl/certs); without it every https:// call to the object
# store fails certificate verification.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed, numeric non-root user, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 sessionizer \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/sessionizer \
        --create-home --shell /usr/sbin/nologin sessionizer

COPY --from=builder /out/sessionizer /usr/local/bin/sessionizer

USER 10001:10001
WORKDIR /home/sessionizer

# The binary is PID 1 and installs no SIGTERM handler, so the kernel ignores SIGTERM for it:
# `docker stop` and a Kubernetes pod deletion end it with SIGKILL after the grace period.
# That is safe (a run killed at any instant and run again is exactly-once; README,
# "Guarantees"); keep the grace period short (scripts/k8s/ uses 10 s).
ENTRYPOINT ["sessionizer"]
CMD ["--help"]
