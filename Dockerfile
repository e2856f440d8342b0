# Rendered by shipyard 0.1.0 for mlp; build it from this folder:
#   docker build -t shipyard-mlp:latest .
FROM python:3.11-slim-bookworm
ENV SHIPYARD_REGISTRY=/var/lib/shipyard/registry \
    SHIPYARD_HOST=0.0.0.0 \
    SHIPYARD_HTTP_PORT=59219 \
    SHIPYARD_GRPC_PORT=55587 \
    SHIPYARD_METRICS_PORT=59593 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 shipyard \
    && useradd --system --uid 10001 --gid shipyard --home-dir /var/lib/shipyard --create-home shipyard
WORKDIR /opt/shipyard
COPY requirements.txt ./
RUN pip install --no-cache-dir --requirement requirements.txt
COPY wheels/ ./wheels/
RUN pip install --no-cache-dir --no-deps wheels/*.whl
COPY --chown=shipyard:shipyard archives/ /opt/shipyard/archives/
USER 10001
RUN shipyard pull /opt/shipyard/archives/mlp-1.shipyard.tar.gz
EXPOSE 59219 55587 59593
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['SHIPYARD_HTTP_PORT'] + '/v2/health/ready', timeout=2)"]
ENTRYPOINT ["shipyard", "serve"]
CMD ["mlp"]
