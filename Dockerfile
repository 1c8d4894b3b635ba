# syntax=docker/dockerfile:1
# shadowlens: the OTLP sidecar as a container image.
#
#   docker build -t shadowlens:0.1.0 .
#   docker run --rm -p 4317:4317 -p 4318:4318 -p 9464:9464 -v shadowlens-data:/data shadowlens:0.1.0
#
# Stage 1 builds wheels for shadowlens (with its optional C wire scanner, hence the compiler) and every
# dependency; stage 2 installs them into a slim image without a compiler and runs as a non-root user.

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY collector ./collector
COPY analyzers ./analyzers
COPY exporters ./exporters
COPY shadowlens ./shadowlens
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -c "import glob, sys, zipfile; w = glob.glob('/wheels/shadowlens-*.whl')[0]; \
sys.exit(0 if any(n.endswith('.so') for n in zipfile.ZipFile(w).namelist()) else 'the C wire scanner was not built')"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels shadowlens \
 && groupadd --system --gid 10001 shadowlens \
 && useradd --system --uid 10001 --gid shadowlens --home-dir /data --no-create-home --shell /usr/sbin/nologin shadowlens \
 && mkdir -p /data /etc/shadowlens \
 && chown shadowlens:shadowlens /data
# Listens on all interfaces (127.0.0.1 inside a container is unreachable from outside it).
COPY deploy/docker/config.yaml /etc/shadowlens/config.yaml

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# OTLP/gRPC, OTLP/HTTP, /metrics + /healthz + /readyz + /gate
EXPOSE 4317 4318 9464
# SIGTERM: stop accepting, drain, commit, exit 0 (give it time: docker stop -t 60)
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/readyz', timeout=2)"]

ENTRYPOINT ["shadowlens"]
CMD ["serve", "--config", "/etc/shadowlens/config.yaml", "--data-dir", "/data"]
