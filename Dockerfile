# Builds every thr binary; docker-compose.yml runs them from this image.
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p http2redis -p redis2http -p slowapp

FROM debian:bookworm-slim
RUN useradd --system --no-create-home thr
COPY --from=build /src/target/release/http2redis /src/target/release/redis2http /src/target/release/slowapp /usr/local/bin/
COPY config /etc/thr
USER thr
