"""Pipeline stages: each module holds a plain function and a thin Prefect @task around it."""
