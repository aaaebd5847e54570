"""Code that ships inside the registered MLflow model (models-from-code, no pickle)."""
