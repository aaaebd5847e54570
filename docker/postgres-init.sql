-- The mlflow database is created by POSTGRES_DB; Prefect gets its own.
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;  -- MLflow's basic-auth users and permissions
CREATE DATABASE optuna;  -- the search stage's Optuna studies (LORA_SEARCH_STORAGE)
