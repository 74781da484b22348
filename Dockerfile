# Wardgate gateway image: `docker build -t wardgate .`
# The C part of the relay is compiled in a build stage; the final image has no compiler.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY wardgate ./wardgate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --home-dir /data wardgate && mkdir -p /data /etc/wardgate && chown wardgate /data
USER wardgate
# The data directory holds this replica's write-ahead journal: keep it on a volume of its own.
ENV WARDGATE_DATA_DIR=/data WARDGATE_CONFIG=/etc/wardgate/wardgate.toml PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 6432 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2)"
ENTRYPOINT ["wardgate"]
CMD ["serve", "--listen", "0.0.0.0:6432", "--http-listen", "0.0.0.0:8080"]
