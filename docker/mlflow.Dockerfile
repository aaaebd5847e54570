# MLflow tracking server image: the official one plus the PostgreSQL driver, boto3 (S3) and
# the basic-auth app's dependencies.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 "boto3>=1.35,<2" "mlflow[auth]==3.17.2"
