# syntax=docker/dockerfile:1
# The GPU worker image: the `ferrite` binary built with the `cuda` feature on the CUDA 13.0 runtime (cudarc loads
# libcuda from the driver, NVRTC, cuBLAS(Lt) and NCCL from this image at run time; nothing CUDA is linked at build).
#   docker build -f deploy/docker/worker.Dockerfile -t ferrite-worker .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ferrite --features cuda && cp target/release/ferrite /ferrite

# The runtime image carries cudart, NVRTC, cuBLAS/cuBLASLt and NCCL. CUDA 13.0 exactly: driver 580's JIT takes the
# PTX that NVRTC 13.0 emits (see ../shared/docs/toolchain.md).
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
# cudarc looks for `libnccl.so`; the image has `libnccl.so.2`.
RUN ln -sf "$(ls /usr/lib/x86_64-linux-gnu/libnccl.so.2* | head -n1)" /usr/lib/x86_64-linux-gnu/libnccl.so \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp ferrite \
    && mkdir -p /var/cache/ferrite && chown ferrite:ferrite /var/cache/ferrite
COPY --from=build /ferrite /usr/local/bin/ferrite
ENV FERRITE_MODEL_DIR=/var/cache/ferrite/models FERRITE_KERNEL_CACHE_DIR=/var/cache/ferrite/kernels \
    FERRITE_BACKEND=cuda FERRITE_WORKER_LISTEN=0.0.0.0:50051 FERRITE_WORKER_METRICS_LISTEN=0.0.0.0:9091 HOME=/tmp
VOLUME ["/var/cache/ferrite"]
USER 10001:10001
EXPOSE 50051 9091
ENTRYPOINT ["ferrite"]
CMD ["worker"]
