# The nudgeflow worker image: `docker compose up` runs it with config/docker.yaml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# dependencies first: this layer is reused while only the code changes
COPY pyproject.toml README.md ./
RUN mkdir -p nudgeflow flows operators connectors/migrations \
 && touch nudgeflow/__init__.py flows/__init__.py operators/__init__.py connectors/__init__.py connectors/migrations/__init__.py \
 && pip install . && pip uninstall -y nudgeflow

COPY nudgeflow nudgeflow
COPY flows flows
COPY operators operators
COPY connectors connectors
COPY config config
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 nudgeflow \
 && mkdir -p /app/.nudgeflow && chown -R nudgeflow /app/.nudgeflow
USER nudgeflow

ENTRYPOINT ["nudgeflow"]
CMD ["run", "--config", "config/docker.yaml", "--no-summary", "--init-recovery"]
