# sessiond: build with `docker build -t sessiond .`
# Protobuf is compiled in pure Rust, so the build stage needs nothing but cargo.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY config ./config
COPY clients/rust ./clients/rust
COPY examples/storefront ./examples/storefront
RUN cargo build --release --locked --bin sessiond --bin sessionctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sessiond /usr/local/bin/sessiond
COPY --from=build /src/target/release/sessionctl /usr/local/bin/sessionctl
COPY --from=build /src/config/sessiond.toml /etc/sessiond/sessiond.toml
# Inside a container the ports must listen on all interfaces. Protected mode refuses a
# plaintext public listener, so this image opts in explicitly: the container network is
# the trust boundary. For anything wider, mount a certificate and set SESSIOND_TLS_CERT,
# SESSIOND_TLS_KEY (and SESSIOND_TLS_CLIENT_CA for mutual TLS), then drop the opt-in.
ENV SESSIOND_LISTEN=0.0.0.0:7420 \
    SESSIOND_ADMIN_LISTEN=0.0.0.0:7421 \
    SESSIOND_INSECURE_LISTEN=true \
    SESSIOND_DATA_DIR=/data/sessiond \
    SESSIOND_LOG_FORMAT=json
# The log and snapshots go to /data/sessiond, which sessiond creates owner-only (0700) on the
# volume: it holds every session. 65532 is distroless's "nonroot" user.
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7420 7421
# Probes: gRPC health on 7420 (Kubernetes `grpc:` probes), HTTP /healthz and /readyz on 7421.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/sessionctl", "--addr", "127.0.0.1:7420", "ping"]
ENTRYPOINT ["/usr/local/bin/sessiond", "--config", "/etc/sessiond/sessiond.toml"]
