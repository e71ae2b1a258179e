# batcher's container image. `make image` builds it, `make image-test` builds it, runs it,
# checks /readyz and POST /predict, then stops it and checks that it drained and exited 0.
#
#   docker build -t batcher .                                  # any machine that reaches PyPI
#   docker run --rm -p 8000:8000 batcher                       # serves the bundled model
#   docker run --rm -p 8000:8000 batcher --set server.workers=2
#   docker run --rm -v $PWD/my-model:/models/my-model:ro -p 8000:8000 batcher /models/my-model
#   docker run --rm --entrypoint batcher batcher check         # any other batcher command
#
# BASE is any Debian-based image with Python 3.11 (python:3.11-slim by default). Where no
# registry is reachable, `make image` builds one from Debian's packages (deploy/image/base.sh)
# and passes it here, and fills wheelhouse/ with the wheels pip would download.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# 1: install only from wheelhouse/ (a build that cannot reach PyPI); 0: PyPI as well.
ARG PIP_NO_INDEX=0
COPY requirements.txt /build/
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/batcher \
    && /opt/batcher/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheelhouse \
        -r /build/requirements.txt
# The wheel, built from the tree (hatchling from PyPI, or wheelhouse/), installed without its
# dependencies: requirements.txt's exact pins are in already (onnxruntime-gpu, which also runs
# on the CPU, where the wheel itself names the CPU build). The bundled model and the default
# config.toml are inside the wheel; nothing of the tree is copied into the image.
COPY pyproject.toml README.md LICENSE config.toml /src/
COPY batcher/ /src/batcher/
COPY loadtest/ /src/loadtest/
COPY models/intent-zh/ /src/models/intent-zh/
COPY data/intents/test.jsonl /src/data/intents/
RUN /opt/batcher/bin/pip wheel --no-cache-dir --disable-pip-version-check --find-links /wheelhouse \
        --no-deps --wheel-dir /dist /src \
    && /opt/batcher/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /dist/batcher-*.whl

FROM ${BASE}
# A system user with no home and no shell; the image never runs as root.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin batcher
COPY --from=build /opt/batcher /opt/batcher
# An empty working directory: a relative MODEL_DIR or --set model.path resolves against it.
WORKDIR /app
# No .pyc files (the root filesystem may be read-only); logs unbuffered; /tmp (a writable
# emptyDir on Kubernetes) for the metrics of several worker processes and as HOME.
ENV PATH=/opt/batcher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8000
# Liveness from inside the container, with the Python it already has (no curl in the image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
# Exec form: `batcher serve` is PID 1 and receives SIGTERM itself, so it drains before it
# exits; arguments after the image name are serve's (MODEL_DIR, --set, --port, ...).
ENTRYPOINT ["/opt/batcher/bin/batcher", "serve"]
CMD []
