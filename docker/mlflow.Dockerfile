# MLflow tracking server image: the official one plus the PostgreSQL driver and boto3 (S3).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 "boto3>=1.35,<2"
