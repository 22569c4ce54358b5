# Airflow image for the local stack (docker-compose.yaml): Airflow + providers, plus the CPU export engine so the
# local runtime can run the steps in-process. Production Airflow images use requirements.txt only (no torch).
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt requirements/engine-cpu.txt requirements/constraints.txt /tmp/req/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c /tmp/req/constraints.txt -r /tmp/req/requirements.txt -r /tmp/req/engine-cpu.txt
