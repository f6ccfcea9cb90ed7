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
COPY tools ./tools
COPY examples/storefront ./examples/storefront
RUN cargo build --release --locked --bin sessiond --bin sessionctl

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sessiond /usr/local/bin/sessiond
COPY --from=build /src/target/release/sessionctl /usr/local/bin/sessionctl
COPY --from=build /src/config/sessiond.toml /etc/sessiond/sessiond.toml
# Inside a container the ports must listen on all interfaces, so protected mode applies: the
# image starts only with TLS and client authentication, and otherwise exits naming what is
# missing. Mount the files and set SESSIOND_TLS_CERT, SESSIOND_TLS_KEY and
# SESSIOND_TLS_CLIENT_CA (mutual TLS), or mount a config with [[tenants]] tokens. Only where
# the container network is the whole trust boundary, set SESSIOND_INSECURE_LISTEN=true.
ENV SESSIOND_LISTEN=0.0.0.0:7420 \
    SESSIOND_ADMIN_LISTEN=0.0.0.0:7421 \
    SESSIOND_DATA_DIR=/data/sessiond \
    SESSIOND_LOG_FORMAT=json
# The log and snapshots go to /data/sessiond, which sessiond creates owner-only (0700) on the
# volume: it holds every session. 65532 is distroless's "nonroot" user.
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 7420 7421 7422
# Probes: HTTP /healthz and /readyz on 7421, which need no client certificate; gRPC health on
# 7420 answers only clients that pass the TLS handshake. The check reads the admin port.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/sessionctl", "--admin-addr", "127.0.0.1:7421", "stats"]
ENTRYPOINT ["/usr/local/bin/sessiond", "--config", "/etc/sessiond/sessiond.toml"]
