"""causal_lm end to end on tiny random decoders: every stage, every gate's value, the flow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import yaml
from transformers import AutoTokenizer

from testkit.tiny import build_tiny_decoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _send_flow_logs_while_the_api_is_up():
    """Flows run here leave logs queued; unsent, they stall the exit and print errors."""
    yield
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def causal_config_dict(tmp: Path, model_dir: Path, data_path: Path, **serve) -> dict:
    """Every stage in seconds on a tiny decoder (greedy answers of 8 tokens)."""
    return {
        "task": "causal_lm",
        "data": {"path": str(data_path), "max_length": 128},
        "model": {"name_or_path": str(model_dir)},
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 0.02, "logging_steps": 5},
        "eval": {"max_new_tokens": 8, "generation_prompts": 16},
        "export": {"parity_prompts": 4},
        "quantize": {"min_token_agreement": 0.5, "max_perplexity_increase": 0.5},
        "serve": {
            "latency_runs": 5,
            "warmup_runs": 1,
            "num_threads": 1,
            "golden_requests": 8,
            "decode_tokens": 8,
            "served_model_check": False,
            **serve,
        },
        "registry": {"model_name": "tiny-chat", "bootstrap_samples": 200},
        "tracking": {
            "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "experiment": "causal",
            "artifact_location": (tmp / "artifacts").as_uri(),
        },
        "output_dir": str(tmp / "outputs"),
    }


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory, demo_frame) -> Path:
    """160 tickets as prompt -> 'Team: <label>' pairs."""
    frame = demo_frame.head(160)
    path = tmp_path_factory.mktemp("causal-data") / "routing.csv"
    pd.DataFrame({"prompt": frame["text"], "response": "Team: " + frame["label"]}).to_csv(
        path, index=False
    )
    return path


def run_all_stages(config):
    from dataclasses import fields

    from conftest import tracked

    from flows.retrain import run_stages
    from tasks.common.tracking import start_pipeline_run

    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id)
    run = tracked(
        config, run_id, gates=out.gates, **{f.name: getattr(out, f.name) for f in fields(out)}
    )
    run.metrics = run.client.get_run(run_id).data.metrics
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, demo_frame, pairs_csv):
    from tasks.common.config import config_from_dict

    tmp = tmp_path_factory.mktemp("causal-llama")
    model_dir = build_tiny_decoder(tmp / "model", list(demo_frame["text"]), "llama")
    config = config_from_dict(
        causal_config_dict(tmp, model_dir, pairs_csv, served_model_check=True)
    )
    out = run_all_stages(config)
    out.tmp, out.model_dir = tmp, model_dir
    return out


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def other_family_run(request, tmp_path_factory, demo_frame, pairs_csv):
    """GPT-2 (Conv1D layers, no chat template) and Qwen2 (the family of configs/causal_lm.yaml)."""
    from tasks.common.config import config_from_dict

    tmp = tmp_path_factory.mktemp(f"causal-{request.param}")
    model_dir = build_tiny_decoder(tmp / "model", list(demo_frame["text"]), request.param)
    out = run_all_stages(config_from_dict(causal_config_dict(tmp, model_dir, pairs_csv)))
    out.family = request.param
    return out


@pytest.fixture
def llama(llama_run):
    return llama_run


def test_every_gate_passes_with_its_value(llama):
    gates = {g.name: g for g in llama.registration.gates}
    assert set(gates) == {
        "merge_parity_max_abs_diff",
        "onnx_parity_max_abs_diff",
        "onnx_greedy_tokens_differing",
        "quantized_token_agreement",
        "quantized_perplexity_increase",
        "served_model_prediction_mismatches",
    }
    assert all(g.passed for g in gates.values())
    assert 0 <= gates["merge_parity_max_abs_diff"].value <= 1e-4
    assert 0 <= gates["onnx_parity_max_abs_diff"].value <= 1e-4
    assert gates["onnx_greedy_tokens_differing"].value == 0  # 32 greedy tokens, token for token
    assert gates["served_model_prediction_mismatches"].value == 0  # mlflow models serve
    chosen = llama.quantized.variant
    if chosen == "fp32":
        assert gates["quantized_token_agreement"].value == 1.0
        assert gates["quantized_perplexity_increase"].value == 0.0
    else:
        candidate = next(c for c in llama.quantized.candidates if c.name == chosen)
        assert gates["quantized_token_agreement"].value == candidate.scores["token_agreement"]
    for name, gate in gates.items():
        assert llama.metrics[f"gate/{name}.value"] == pytest.approx(gate.value)
    assert llama.registration.promoted  # first version: no production to beat


def test_training_learns_the_responses(llama):
    m = llama.metrics
    assert m["test/perplexity"] == pytest.approx(np.exp(m["test/loss"]), rel=1e-6)
    assert m["test/loss"] < m["test/base.loss"] - 1.0  # the adapter learnt the routing answers
    assert m["test/rouge_l"] > m["test/base.rouge_l"]
    assert llama.figures()["response_tokens.train"] > 0 and m["train/trainable_params"] > 0


def test_generations_table_is_logged(llama):
    client = llama.client
    table = json.loads(llama.text("evaluation/generations.json"))
    assert table["columns"][:4] == ["prompt", "reference", "candidate", "base"]
    assert len(table["data"]) == 16
    names = {f.path for f in client.list_artifacts(llama.run_id, "evaluation")}
    assert "evaluation/test_generations.csv" in names


def test_served_answers_equal_the_adapter_model_answers(llama):
    """fp32 served: the ONNX pyfunc answers exactly like the PyTorch adapter model."""
    csv = Path(llama.config.output_dir) / llama.run_id / "evaluation" / "test_generations.csv"
    candidate = pd.read_csv(csv, keep_default_na=False)["candidate"].tolist()
    if llama.quantized.variant == "fp32":
        assert llama.served.answers == candidate
    assert llama.served.metrics["rouge_l"] == pytest.approx(llama.metrics["serve/rouge_l"])
    assert len(llama.served.scores) == len(candidate) == 16


def test_serve_check_times_first_token_and_decoding(llama):
    t = llama.served.timings
    for engine in ("onnx", "torch"):
        assert 0 < t[f"serve/{engine}.ttft_p50_ms"] <= t[f"serve/{engine}.ttft_p99_ms"]
        assert t[f"serve/{engine}.tokens_per_second"] > 0
    assert llama.served.provider == "CPUExecutionProvider"
    plots = {f.path for f in llama.client.list_artifacts(llama.run_id, "plots")}
    assert plots == {"plots/serving_latency.png"}


def test_merged_folder_is_complete_for_serving_elsewhere(llama):
    from transformers import GenerationConfig

    folder = llama.fetch(llama.merged.model)
    base_tokenizer = AutoTokenizer.from_pretrained(llama.model_dir)
    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.chat_template == base_tokenizer.chat_template
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(saved, name) == getattr(base_tokenizer, name)
    assert saved.get_vocab() == base_tokenizer.get_vocab()
    generation = GenerationConfig.from_pretrained(folder)
    assert base_tokenizer.eos_token_id in np.atleast_1d(generation.eos_token_id)
    assert generation.pad_token_id == base_tokenizer.pad_token_id
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))


def test_merge_refuses_a_folder_that_lost_its_chat_template(llama, tmp_path):
    from tasks.causal.merge import check_complete
    from tasks.common.errors import ModelError

    folder = tmp_path / "merged"
    shutil.copytree(llama.fetch(llama.merged.model), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="chat template differs"):
        check_complete(folder, tokenizer)


def test_onnx_export_has_a_kv_cache(llama):
    folder = llama.fetch(llama.onnx.model)
    names = [i.name for i in ort.InferenceSession(str(folder / "model.onnx")).get_inputs()]
    assert "input_ids" in names and any(n.startswith("past_key_values") for n in names)


def test_quantize_records_each_variant(llama):
    choice = json.loads(llama.text("quantized/choice.json"))
    assert [c["name"] for c in choice["candidates"]] == [
        "dynamic_per_channel",
        "dynamic_per_tensor",
    ]
    for c in choice["candidates"]:
        assert 0 <= c["token_agreement"] <= 1 and c["perplexity"] > 1 and c["size_mb"] > 0
        assert {g["name"] for g in c["gates"]} == {
            "quantized_token_agreement",
            "quantized_perplexity_increase",
        }
    assert choice["chosen"] == llama.quantized.variant


def test_registered_version_serves_chat_requests(llama):
    name = llama.registration.model_name
    version = llama.client.get_model_version(name, llama.registration.version)
    assert version.tags["task"] == "causal_lm"
    with llama.tracking.fluent():
        model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    answers = model.predict(
        pd.DataFrame({"prompt": ["Where is my parcel?"]}), params={"max_new_tokens": 3}
    )
    assert list(answers.columns) == ["text", "new_tokens", "finish_reason"]
    assert answers["new_tokens"][0] <= 3
    report = json.loads(llama.text("promotion/report.json"))
    assert report["candidate_adapter_metrics"]["perplexity"] > 1
    assert report["candidate_served_metrics"] == llama.served.metrics
    markdown = llama.text("promotion/report.md")
    assert "ROUGE-L" in markdown and "time to first token" in markdown


def test_gpt2_and_qwen2_families_run_every_stage(other_family_run):
    from tasks.causal.formatting import DEFAULT_CHAT_TEMPLATE

    run = other_family_run
    assert all(g.passed for g in run.registration.gates)
    assert run.metrics["gate/onnx_greedy_tokens_differing.value"] == 0
    assert run.metrics["test/loss"] < run.metrics["test/base.loss"]
    tags = run.client.get_run(run.run_id).data.tags
    targets = tags["lora.target_names"]
    saved = AutoTokenizer.from_pretrained(run.fetch(run.merged.model))
    if run.family == "gpt2":
        assert tags["data.chat_template"] == "default"
        assert "c_attn" in targets and "c_fc" in targets
        assert saved.chat_template == DEFAULT_CHAT_TEMPLATE
    else:
        assert tags["data.chat_template"] == "tokenizer"
        assert all(f".{name}" in targets for name in ("q_proj", "o_proj", "gate_proj", "down_proj"))
        assert saved.chat_template.startswith("{% for message in messages %}")


def test_flow_retrains_and_compares_with_production(llama, monkeypatch):
    """A second run through the Prefect flow meets the first as production: paired comparison."""
    from flows.retrain import retrain_flow

    config = causal_config_dict(
        llama.tmp, llama.model_dir, Path(llama.config.data.path), served_model_check=False
    )
    config_path = llama.tmp / "causal.yaml"
    config_path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(ROOT)
    result = retrain_flow(config_path=str(config_path), overrides=["train.epochs=2"])
    assert result["status"] == "completed" and result["metric"] == "rouge_l"
    metrics = llama.client.get_run(result["run_id"]).data.metrics
    assert "production/rouge_l" in metrics and "production/exact_match" in metrics
    low = metrics["production/rouge_l_delta_ci_low"]
    assert low <= metrics["production/rouge_l_delta"] <= metrics["production/rouge_l_delta_ci_high"]
    assert metrics["gate/champion_rouge_l_delta_ci_low.value"] == pytest.approx(low)


def test_fp16_variant_of_the_kv_cache_graph_keeps_its_interface_and_answers(llama, tmp_path):
    """The GPU target's conversion (run here on the CPU provider; no CUDA in CI)."""
    from tasks.causal.data import load_data_tokenizer
    from tasks.causal.generation import greedy_new_tokens, token_agreement
    from tasks.causal.merge import probe_prompts
    from tasks.causal.modeling import open_causal_onnx
    from tasks.common.onnx import convert_fp16

    fp32_dir = llama.fetch(llama.onnx.model)
    fp16_dir = tmp_path / "fp16"
    shutil.copytree(fp32_dir, fp16_dir)
    convert_fp16(fp32_dir / "model.onnx", fp16_dir / "model.onnx")
    sessions = [ort.InferenceSession(str(d / "model.onnx")) for d in (fp32_dir, fp16_dir)]
    interfaces = [[(i.name, i.type) for i in s.get_inputs()] for s in sessions]
    assert interfaces[0] == interfaces[1]  # fp32 inputs and past key/values kept
    tokenizer = load_data_tokenizer(llama.stage, llama.data)
    prompts = probe_prompts(llama.stage, llama.data)
    tokens = [
        greedy_new_tokens(open_causal_onnx(d, "model.onnx"), tokenizer, prompts, 16, 16)
        for d in (fp32_dir, fp16_dir)
    ]
    assert token_agreement(*tokens) >= 0.9


def test_causal_training_on_the_gpu_deployment_travels_through_mlflow(
    tmp_path, demo_frame, pairs_csv, monkeypatch
):
    """train.deployment set: lora-train runs as a worker would (stand-in for run_deployment, its
    own output folder), gets the data and chat tokenizer from MLflow, sends the adapter back."""
    from test_train_deployment import FakeDeploymentRunner

    import flows.train as train_module
    from flows.retrain import retrain_flow
    from tasks.causal.formatting import DEFAULT_CHAT_TEMPLATE

    model_dir = build_tiny_decoder(tmp_path / "model", list(demo_frame["text"]), "gpt2")
    config = causal_config_dict(tmp_path, model_dir, pairs_csv)
    config["train"]["deployment"] = "lora-train/gpu"
    config["output"] = {"keep": True}  # the test compares the worker's and the pipeline's folders
    config_path = tmp_path / "causal.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runner = FakeDeploymentRunner(tmp_path / "worker")
    monkeypatch.setattr(train_module, "run_deployment", runner)
    result = retrain_flow(config_path=str(config_path))
    assert result["status"] == "completed" and len(runner.calls) == 1
    assert "label_names" not in runner.calls[0]["parameters"]["data"]  # no classes in causal_lm
    worker = tmp_path / "worker" / result["run_id"]
    saved = AutoTokenizer.from_pretrained(worker / "adapter")
    assert saved.chat_template == DEFAULT_CHAT_TEMPLATE  # the template the data was formatted by
    pipeline = tmp_path / "outputs" / result["run_id"] / "adapter" / "adapter_model.safetensors"
    assert pipeline.read_bytes() == (worker / "adapter" / "adapter_model.safetensors").read_bytes()
    adapter_config = json.loads((worker / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"


def test_the_registered_chat_model_says_what_it_is_for(llama):
    from tasks.causal import kind

    description = llama.client.get_registered_model(llama.registration.model_name).description
    assert description == kind.DESCRIPTION and "chat decoder" in description
