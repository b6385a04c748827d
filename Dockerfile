# Builds every thr binary; docker-compose.yml runs them from this image.
#   docker build -t thr .
# The default command runs the front with /etc/thr/thr.toml (config/thr.toml
# here), which listens on 127.0.0.1 only: mount your own configuration
# (listen = "0.0.0.0:8080", admin = "0.0.0.0:9180", ...) over it, or pass
# another --config, as docker-compose.yml does. THR_REDIS_URL overrides the
# file's Redis URL.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p http2redis -p redis2http -p thrctl -p slowapp

FROM debian:bookworm-slim
# CA roots for rediss:// (thr verifies Redis's certificate against them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home thr
COPY --from=build \
    /src/target/release/http2redis \
    /src/target/release/redis2http \
    /src/target/release/thrctl \
    /src/target/release/slowapp \
    /usr/local/bin/
COPY config /etc/thr
COPY LICENSE-MIT LICENSE-APACHE /usr/share/doc/thr/
USER thr
# 8080: the front's listener; 9180, 9181: the front's and the workers' admin
# (metrics, /healthz, /readyz).
EXPOSE 8080 9180 9181
CMD ["http2redis", "--config", "/etc/thr/thr.toml"]
