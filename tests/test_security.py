"""Security: no planted secret reaches MLflow; weights are safetensors only; remote code is off."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.common.credentials import redact
from tasks.common.tracking import Tracking, start_pipeline_run


def test_redact_removes_url_credentials():
    assert (
        redact("https://alice:s3cr3t@mlflow.example.com/api")
        == "https://***@mlflow.example.com/api"
    )
    assert (
        redact("postgresql+psycopg2://u:p@db:5432/mlflow")
        == "postgresql+psycopg2://***@db:5432/mlflow"
    )
    assert redact("data/demo/support_tickets.csv") == "data/demo/support_tickets.csv"


def _artifact_texts(client: MlflowClient, run_id: str, path: str | None = None):
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            yield from _artifact_texts(client, run_id, item.path)
        elif item.file_size and item.file_size < 5_000_000:
            local = client.download_artifacts(run_id, item.path)
            yield item.path, Path(local).read_bytes()


def test_planted_secrets_are_not_in_params_tags_or_logged_files(run, planted_secret):
    PLANTED = planted_secret
    client = run.client
    data = client.get_run(run.run_id).data
    assert PLANTED not in repr(data.params) and PLANTED not in repr(data.tags)
    files = list(_artifact_texts(client, run.run_id))
    assert len(files) > 20  # the scan did look at the run's files
    leaked = [path for path, content in files if PLANTED.encode() in content]
    assert leaked == []
    version = client.get_model_version("tiny-classifier", "1")
    assert PLANTED not in repr(version.tags)


def test_credentials_in_config_urls_are_redacted(make_tiny_config, tmp_path, planted_secret):
    PLANTED = planted_secret
    config = make_tiny_config(tmp_path, [f"data.path=https://bob:{PLANTED}@data.example.com/t.csv"])
    run_id = start_pipeline_run(config)
    client = Tracking.connect(config.tracking).client
    data = client.get_run(run_id).data
    assert data.params["data.path"] == "https://***@data.example.com/t.csv"
    assert PLANTED not in repr(data.params) and PLANTED not in repr(data.tags)
    resolved = Path(client.download_artifacts(run_id, "config/resolved.yaml")).read_text()
    assert PLANTED not in resolved and "https://***@data.example.com/t.csv" in resolved
    assert data.tags["model.trust_remote_code"] == "False"


def test_model_weights_are_read_and_written_as_safetensors_only(run):
    for folder in (run.fetch(run.trained.adapter), run.fetch(run.merged.model)):
        names = {p.name for p in folder.iterdir()}
        assert any(n.endswith(".safetensors") for n in names)
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names)
