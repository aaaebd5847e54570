"""The register stage, task-neutral: decision, served-model check, registry transaction, report."""
