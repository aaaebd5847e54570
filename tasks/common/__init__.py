"""Plumbing every task kind shares: config, errors, MLflow, storage, gates, ONNX, training."""
