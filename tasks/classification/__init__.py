"""Text classification (the embedded default): every stage for task sequence_classification."""
