# Multipole on an NVIDIA CUDA devel image (not buildable in the project's sandbox: untested).
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake ninja-build g++ pkg-config libsentencepiece-dev nlohmann-json3-dev \
      libcpp-httplib-dev libdnnl-dev libgtest-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /multipole
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_TESTS=OFF \
 && cmake --build build
EXPOSE 8080
ENTRYPOINT ["build/tools/multipole-generate", "--model", "models/default.gguf"]
CMD ["Once upon a time"]
