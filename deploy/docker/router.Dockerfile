# syntax=docker/dockerfile:1
# The router image: the `ferrite` binary without CUDA (it also runs CPU workers and `ferrite serve`).
#   docker build -f deploy/docker/router.Dockerfile -t ferrite-router .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ferrite && cp target/release/ferrite /ferrite

FROM debian:bookworm-slim
# ca-certificates: the default model is fetched over HTTPS on first use.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp ferrite \
    && mkdir -p /var/cache/ferrite /var/lib/ferrite && chown ferrite:ferrite /var/cache/ferrite /var/lib/ferrite
COPY --from=build /ferrite /usr/local/bin/ferrite
ENV FERRITE_MODEL_DIR=/var/cache/ferrite/models FERRITE_HOST=0.0.0.0 HOME=/tmp
# The model cache (default model, kernels) and the raft data directory.
VOLUME ["/var/cache/ferrite", "/var/lib/ferrite"]
USER 10001:10001
EXPOSE 8000 7000
ENTRYPOINT ["ferrite"]
CMD ["router"]
