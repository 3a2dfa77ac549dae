# Multipole's OpenAI-compatible server on an NVIDIA CUDA image (README, "Docker"):
#   docker build -t multipole .
#   docker run --gpus all -p 8080:8080 -v multipole-state:/state multipole
# The tools are other commands of the same image (docker run --rm multipole multipole-generate ...).
# It cannot be built in the project's sandbox (no registry for base images): kept minimal.

# Build stage: the compilers and headers; no Python or PyTorch (tests off, so no cross-checks).
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake ninja-build g++ pkg-config libsentencepiece-dev nlohmann-json3-dev libcpp-httplib-dev \
      libdnnl-dev libhiredis-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_TESTS=OFF -DMULTIPOLE_CUDA=ON \
 && cmake --build build \
 && install -D -t /opt/multipole/bin build/server/multipole-server build/tools/multipole-generate \
      build/tools/multipole-batch build/tools/multipole-convert build/tools/multipole-perplexity \
 && install -D -m 644 -t /opt/multipole/models models/default.gguf

# Run stage: the CUDA runtime (cuBLAS included) and the libraries the binaries link. The -dev
# packages are named here because their runtime libraries' names change between releases.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libsentencepiece-dev libcpp-httplib-dev libdnnl-dev libhiredis-dev libgomp1 curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/multipole /opt/multipole
ENV PATH=/opt/multipole/bin:$PATH
WORKDIR /opt/multipole
# Sessions persist here (--state-dir): one file of about 1 MiB each, whatever its length.
VOLUME /state
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
CMD ["multipole-server", "--host", "0.0.0.0", "--port", "8080", "--model", "/opt/multipole/models/default.gguf", "--state-dir", "/state"]
