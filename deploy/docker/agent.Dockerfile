# syntax=docker/dockerfile:1
# The node agent. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t exfilguard-agent:dev .
#
# The agent embeds its eBPF object, which its build.rs compiles for the BPF
# target with nightly Rust and bpf-linker (linked against nightly's own
# LLVM). `cargo xtask setup` installs exactly that, the same way CI does (see
# xtask/src/setup/ and shared TOOLCHAIN notes), so the image uses it too.

FROM docker.io/library/rust:1.95-bookworm AS build
# aya-build compiles with the toolchain named "nightly"; rust-src lets it
# build `core` for bpfel-unknown-none.
RUN rustup toolchain install nightly --profile minimal --component rust-src,rust-docs
WORKDIR /src
COPY . .
RUN cargo xtask setup
RUN cargo build --release --locked -p exfilguard-agent --bin exfilguard-agent \
 && install -D -m 0755 target/release/exfilguard-agent /out/exfilguard-agent

# glibc and nothing else: no shell, no package manager. The agent runs as
# root with only CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (deploy/manifests/30-agent.yaml).
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/exfilguard-agent /usr/local/bin/exfilguard-agent
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/exfilguard-agent"]
CMD ["run"]
