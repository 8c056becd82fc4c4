# Multi-stage build: dependencies in a builder layer, a small non-root runtime image.
FROM python:3.11-slim AS builder
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Dependencies first so source edits do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p server sartiq_grpc && touch server/__init__.py sartiq_grpc/__init__.py \
    && pip install --no-cache-dir '.[postgres,s3]' \
    && pip uninstall -y sartiq-generation
COPY server ./server
COPY sartiq_grpc ./sartiq_grpc
RUN pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin sartiq \
    && mkdir -p /var/lib/sartiq && chown sartiq /var/lib/sartiq
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SARTIQ_SERVER__HOST=0.0.0.0 \
    SARTIQ_DATABASE__URL=sqlite+aiosqlite:////var/lib/sartiq/sartiq.db \
    SARTIQ_MEDIA__ARTIFACT_DIR=/var/lib/sartiq/artifacts
# It listens on 0.0.0.0, so it refuses to start without authentication: mount keys and set
# SARTIQ_AUTH__API_KEYS_FILE (or SARTIQ_AUTH__JWT_KEYS_FILE). With TLS configured, the
# health check below (plaintext) must be replaced by the orchestrator's own.
USER 10001
WORKDIR /var/lib/sartiq
VOLUME ["/var/lib/sartiq"]
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=6s --start-period=10s --retries=3 \
    CMD ["sartiq", "--target", "127.0.0.1:50051", "health"]
# The same image runs the compute server: --entrypoint sartiq-compute-server (port 8700,
# SARTIQ_COMPUTE_SERVER__HOST=0.0.0.0).
ENTRYPOINT ["sartiq-server"]
