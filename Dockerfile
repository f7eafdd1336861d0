# escale in a container: the binary drives the host's Docker engine through its socket.
#
#   docker build -t escale .
#   docker run -d --name escale --network host --restart unless-stopped \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/lib/escale:/var/lib/escale \
#     -v /etc/escale:/etc/escale:ro \
#     escale
#   docker logs escale            # the one-time setup token, on first start
#
# --network host: the proxy binds :80/:443 on the host and reaches instances at their bridge
# addresses, as a binary on the host would. The engine socket is root on the host: whoever
# controls this container controls the machine, as with any tool that drives Docker.
# Data (registry, master key, git repositories, certificates) lives in /var/lib/escale: keep it
# on the host and back it up (`escale backup`). Configuration: /etc/escale/escale.toml (the
# sample, every key documented, is in the image) or ESCALE_* variables.
#
# Stages: `runtime` (Debian, git for push deploys, CA roots for ACME and webhooks; no
# toolchain), `build` (the Rust toolchain), and the final image = runtime + the binary. CI
# builds `--target runtime` from a base it makes itself (no registry there: BASE names it) and
# adds the binary of the test run; see tests/it/image.rs.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS runtime
# A base that already carries git and the CA roots (CI's debootstrap) needs no apt.
RUN if ! command -v git >/dev/null || [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates git \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY config/escale.toml /etc/escale/escale.toml
ENV ESCALE_DATA_DIR=/var/lib/escale \
    ESCALE_API_ADDR=127.0.0.1:7300
VOLUME /var/lib/escale
EXPOSE 80 443 7300
STOPSIGNAL SIGTERM
ENTRYPOINT ["escale"]
CMD ["serve"]

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY config config
# The systemd unit `escale install` writes is compiled in.
COPY dist dist
COPY web web
COPY benches benches
RUN cargo build --release --locked --bin escale && strip target/release/escale

FROM runtime
COPY --from=build /src/target/release/escale /usr/local/bin/escale
