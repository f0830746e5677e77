# syntax=docker/dockerfile:1
# One image for every raylm pod: Ray head and workers, the RayJob submitters and the control API.
#
#   CPU:  docker build -t raylm:2.60.0-cpu .
#   CUDA: docker build --build-arg RAY_PLATFORM=gpu -t raylm:2.60.0-gpu .
#
# RAY_VERSION must equal the `ray[...]==` pin in pyproject.toml (tests/test_k8s.py checks it):
# every pod of a Ray cluster, and the client that submits to it, must run the same Ray. The tag
# starts with the Ray version because KubeRay's rayVersion and the image have to agree.
ARG RAY_VERSION=2.60.0
# cpu: Ubuntu base. gpu: the CUDA base Ray publishes (an alias of its newest -cuXXX tag); a
# specific one such as cu128 works as well.
ARG RAY_PLATFORM=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_PLATFORM}

ARG RAY_VERSION
ARG RAY_PLATFORM
# The Makefile's CPU pin; CUDA builds take the same version's default (CUDA) wheel from PyPI.
ARG TORCH_VERSION=2.13.0

ENV RAY_USAGE_STATS_ENABLED=0 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and alone: the CPU wheel is half a gigabyte smaller than the CUDA one, and pip would
# otherwise pick the CUDA wheel while resolving the project.
RUN if [ "$RAY_PLATFORM" = cpu ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

# Created by the ray user (WORKDIR alone would make it root's, and pip could not write there).
RUN mkdir -p /home/ray/raylm
WORKDIR /home/ray/raylm
# Dependencies before sources, so that editing code does not reinstall them.
COPY --chown=1000:100 pyproject.toml README.md ./
RUN mkdir -p model jobs cluster service && \
    touch model/__init__.py jobs/__init__.py cluster/__init__.py service/__init__.py && \
    pip install -e . && \
    rm -rf model jobs cluster service
COPY --chown=1000:100 model model
COPY --chown=1000:100 jobs jobs
COPY --chown=1000:100 cluster cluster
COPY --chown=1000:100 service service
COPY --chown=1000:100 configs configs
# Editable: model presets are read from configs/ next to the sources, not from site-packages.
# Then fail the build, rather than the cluster, if the project pulled in another Ray.
RUN pip install --no-deps -e . && \
    python -c "import ray, sys; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'image has Ray {v}, expected ${RAY_VERSION}')" && \
    python -c "import jobs.pretrain, service.kuberay" && \
    raylm --help > /dev/null

EXPOSE 8000
