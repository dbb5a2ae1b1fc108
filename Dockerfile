# The moeray image: Ray (with Serve and Train) plus this package. The Helm chart's default
# image.repository/tag point at it (ghcr.io/moeray/moeray:<version>).
#
#   docker build -t ghcr.io/moeray/moeray:0.1.0 .                                  # CPU
#   docker build -t ghcr.io/moeray/moeray:0.1.0-cuda \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .         # GPU
#
# Keep RAY_IMAGE's Ray version equal to the chart's rayVersion and moeray.platform.kube.RAY_VERSION.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# torch first from the matching index: a plain `pip install .` would resolve torch from PyPI,
# which is the multi-GB CUDA build even for the CPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/moeray
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 moeray ./moeray
RUN pip install --no-cache-dir . && rm -rf build

# The Ray images' user "ray"; numeric so that Kubernetes can enforce runAsNonRoot.
USER 1000:100
WORKDIR /home/ray
