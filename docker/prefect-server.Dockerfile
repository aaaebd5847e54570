# Prefect server image: the official one with SQLAlchemy kept below 2.1, on which Prefect 3.8's
# scheduler fails to insert scheduled runs (the nightly deployment would never run).
FROM prefecthq/prefect:3.8.8-python3.11
RUN pip install --no-cache-dir "sqlalchemy[asyncio]==2.0.58"
