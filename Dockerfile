# escale in a container: the binary talks to the host's Docker engine through its socket.
#
#   docker build -t escale .
#   docker run -d --name escale --network host \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /var/lib/escale:/var/lib/escale escale
#
# --network host lets the proxy bind :80/:443 and reach instances published on 127.0.0.1.
# Restarting without dropping a request (a new `escale serve` taking the sockets over on the
# same data dir, see README) is tested on a host, not across containers.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The manifest names the benches: cargo needs their files to load it.
COPY benches benches
COPY src src
COPY migrations migrations
COPY config config
COPY dist dist
RUN cargo build --release --locked && strip target/release/escale

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/escale /usr/local/bin/escale
COPY config/escale.toml /etc/escale/escale.toml
ENV ESCALE_DATA_DIR=/var/lib/escale ESCALE_API_ADDR=127.0.0.1:7300
VOLUME /var/lib/escale
EXPOSE 80 443
ENTRYPOINT ["escale"]
CMD ["serve"]
