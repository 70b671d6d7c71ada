# syntax=docker/dockerfile:1
# The controller and exfilctl. Build from the repository root:
#   docker build -f deploy/docker/controller.Dockerfile -t exfilguard-controller:dev .

FROM docker.io/library/rust:1.95-bookworm AS build
# protoc for proto/'s build script; SQLite is compiled in (rusqlite "bundled").
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p exfilguard-controller --bins \
 && install -D -m 0755 target/release/exfilguard-controller /out/exfilguard-controller \
 && install -D -m 0755 target/release/exfilctl /out/exfilctl

# glibc and CA roots only; runs as the image's non-root user (65532), which
# deploy/manifests/20-controller.yaml also sets.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/exfilguard-controller /out/exfilctl /usr/local/bin/
EXPOSE 7443
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/exfilguard-controller"]
CMD ["serve"]
