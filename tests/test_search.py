"""The search stage (Optuna) on the tiny BERT: reproducible, pruned, resumable, parallel, and
the test split is never opened while it runs.

Trials train for two epochs on 200 rows; a search of 6 trials takes about a minute here.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect.states import Completed, Crashed, Failed, Running
from safetensors import safe_open
from transformers import TrainerControl, TrainerState

import flows.search as search_flows
import tasks.train_adapter as train_adapter_module
from flows.retrain import run_stages
from flows.train import train_flow
from tasks.common.errors import ConfigError, TrainingError
from tasks.common.faults import KILL_AT_ENV
from tasks.common.tracking import Tracking, start_pipeline_run
from tasks.search import study as studies
from tasks.search.report import trials_frame
from tasks.search.trial import PruningReporter

SPACE = [  # small and quick: what the default space searches, over values the tiny BERT likes
    'search.space={"lora.r": {"choices": [2, 4]}, "lora.alpha": {"choices": [1, 2], '
    '"times": "lora.r"}, "train.learning_rate": {"low": 0.001, "high": 0.05, "log": true}}',
]


def search_config(make_tiny_config, tmp: Path, *more: str):
    return make_tiny_config(
        tmp,
        [
            "search.enabled=true",
            "search.n_trials=6",
            "search.startup_trials=3",
            "train.checkpoint_steps=0",
            *SPACE,
            *more,
        ],
    )


def open_run_study(config, run_id: str) -> optuna.Study:
    return optuna.load_study(
        study_name=studies.study_name(run_id), storage=studies.storage_url(config)
    )


def searched(config, until: str = "search"):
    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until=until)
    return run_id, out


@pytest.fixture(scope="module")
def first_search(tmp_path_factory, make_tiny_config):
    """A 6-trial search, and the same config searched again in another store."""
    runs = []
    for name in ("first", "second"):
        config = search_config(make_tiny_config, tmp_path_factory.mktemp(name))
        run_id, out = searched(config)
        runs.append((config, run_id, out))
    return runs


def trial_params(config, run_id: str) -> list[dict]:
    return [t.params for t in open_run_study(config, run_id).trials]


def test_a_seeded_search_is_reproducible(first_search):
    (config_a, run_a, _), (config_b, run_b, _) = first_search
    params = trial_params(config_a, run_a)
    assert len(params) == 6
    assert params == trial_params(config_b, run_b)
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 6  # six different trials


def test_the_winner_is_the_best_validation_score_and_its_adapter_goes_on(first_search):
    config, run_id, out = first_search[0]
    study = open_run_study(config, run_id)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert out.trained.chosen["lora.r"] == best.params["lora.r"]
    assert (
        out.trained.chosen["lora.alpha"] == best.params["lora.alpha/lora.r"] * best.params["lora.r"]
    )
    tracking = Tracking.connect(config.tracking)
    tags = tracking.client.get_run(run_id).data.tags
    assert tags["search.best_trial"] == str(best.number)
    assert tags["search.adopted_from_run"] == best.user_attrs[studies.RUN_ATTR]
    adapter = json.loads((Path(out.trained.adapter.local_path) / "adapter_config.json").read_text())
    assert adapter["r"] == best.params["lora.r"]  # the trial's own adapter, not a retrain
    winner = tracking.client.download_artifacts(tags["search.adopted_from_run"], "adapter")
    assert (Path(winner) / "adapter_model.safetensors").read_bytes() == (
        Path(out.trained.adapter.local_path) / "adapter_model.safetensors"
    ).read_bytes()


def test_every_trial_is_a_nested_run_with_its_state_and_the_parent_has_the_report(first_search):
    config, run_id, _ = first_search[0]
    tracking = Tracking.connect(config.tracking)
    children = tracking.client.search_runs(
        [tracking.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'"
    )
    assert len(children) == 6
    study = open_run_study(config, run_id)
    by_run = {t.user_attrs[studies.RUN_ATTR]: t for t in study.trials}
    for child in children:
        trial = by_run[child.info.run_id]
        state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[trial.state.name]
        assert child.data.tags["search.state"] == state
        assert float(child.data.params["lora.r"]) == trial.params["lora.r"]
        assert "eval/macro_f1" in child.data.metrics
    artifacts = {a.path for a in tracking.client.list_artifacts(run_id, "search/plots")}
    plots = ("optimization_history", "param_importances", "parallel_coordinate")
    assert {f"search/plots/{name}.png" for name in (*plots, "rank_vs_learning_rate")} == artifacts
    table = json.loads(
        Path(tracking.client.download_artifacts(run_id, "search/trials.json")).read_text()
    )
    assert len(table["data"]) == 6


def test_the_median_pruner_stops_a_trial_below_the_median_after_one_epoch():
    """Two finished trials scored 0.8 and 0.9 after epoch 1: a third at 0.2 is pruned there,
    one at 0.95 goes on."""
    study = optuna.create_study(direction="maximize", pruner=studies.pruner(_median()))
    for value in (0.8, 0.9):
        trial = study.ask()
        trial.report(value, step=1)
        study.tell(trial, value)
    for score, pruned in ((0.2, True), (0.95, False)):
        reporter = PruningReporter(study.ask(), "macro_f1")
        control = TrainerControl()
        after_one = TrainerState(global_step=10, max_steps=30, epoch=1.0)
        reporter.on_evaluate(None, after_one, control, metrics={"eval_macro_f1": score})
        assert reporter.pruned is pruned and control.should_training_stop is pruned
        control.should_evaluate = True  # the epoch's end, where a pruned trial is not scored
        reporter.on_epoch_end(None, after_one, control)
        assert control.should_evaluate is not pruned
    assert study.trials[2].user_attrs[studies.EPOCHS_ATTR] == 1.0  # where it was stopped
    last = PruningReporter(study.ask(), "macro_f1")  # below the median, but training is done
    done = TrainerState(global_step=30, max_steps=30, epoch=3.0)
    last.on_evaluate(None, done, TrainerControl(), metrics={"eval_macro_f1": 0.1})
    assert not last.pruned


def test_the_pruner_hears_scores_within_an_epoch():
    """reports_per_epoch=2 on 9 steps an epoch: an extra evaluation after step 5 of each epoch;
    the epoch's end is the Trainer's own."""
    reporter = PruningReporter(None, "macro_f1", per_epoch=2)
    args = SimpleNamespace(gradient_accumulation_steps=2)
    reporter.on_train_begin(args, None, None, train_dataloader=range(18))
    asked = []
    state = TrainerState(global_step=0, max_steps=27)
    for _ in range(3):
        reporter.on_epoch_begin(args, state, None)
        for _ in range(9):
            state.global_step += 1
            control = TrainerControl()
            reporter.on_step_end(args, state, control)
            asked += [state.global_step] if control.should_evaluate else []
    assert asked == [5, 14, 23]


def _median():
    from tasks.common.config import SearchConfig

    return SearchConfig(pruner="median", pruner_startup_trials=2)


def test_a_search_prunes_trials_in_practice(first_search):
    config, run_id, _ = first_search[0]
    study = open_run_study(config, run_id)
    done = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and sum(t.state == done[0] for t in study.trials) >= 2
    for trial in pruned:  # stopped where it fell below the median of the trials before it
        step = max(trial.intermediate_values)
        earlier = [
            t.intermediate_values[step]
            for t in study.trials[: trial.number]
            if t.state == done[0] and step in t.intermediate_values  # Optuna: complete ones
        ]
        assert trial.intermediate_values[step] < statistics.median(earlier)


def test_the_test_split_is_never_opened_during_the_search(tmp_path, make_tiny_config, monkeypatch):
    config = search_config(make_tiny_config, tmp_path, "search.n_trials=2")
    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until="prepare_data")
    tokenized = Path(out.data.dataset.local_path) / "tokenized"
    shutil.rmtree(tokenized / "test")  # any read of the test split now fails
    opened = []
    real = train_adapter_module.load_from_disk
    monkeypatch.setattr(
        train_adapter_module, "load_from_disk", lambda path: opened.append(path) or real(path)
    )
    from tasks import stages

    trained = stages.search(config, out.data, run_id)
    assert trained.chosen
    assert opened and not any(Path(p).name == "test" for p in opened)


@pytest.mark.parametrize(
    "space, named",
    [
        ('{"lora.rank": {"choices": [4]}}', "search.space.lora.rank: no such setting"),
        ('{"lora.r": {"choices": []}}', "search.space.lora.r: choices is empty"),
        (
            '{"train.learning_rate": {"low": 0.01, "high": 0.001}}',
            "search.space.train.learning_rate: inverted range",
        ),
        ('{"lora.dropout": {"choices": [0.0, 1.5]}}', "search.space.lora.dropout: the value 1.5"),
        ('{"data.max_length": {"choices": [32]}}', "search.space.data.max_length: only training"),
    ],
)
def test_a_bad_space_fails_before_any_training_naming_the_key(
    tmp_path, make_tiny_config, space, named
):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        make_tiny_config(tmp_path, ["search.enabled=true", f"search.space={space}"])


def test_the_trials_table_names_values_and_states(first_search):
    config, run_id, _ = first_search[0]
    frame = trials_frame(open_run_study(config, run_id), config)
    assert list(frame["trial"]) == list(range(6))
    assert set(frame["state"]) <= {"complete", "pruned", "failed"}
    assert {"lora.r", "lora.alpha", "train.learning_rate", "mlflow_run_id"} <= set(frame.columns)


NO_LAYER = '{"choices": {"none": ["no_such_layer"], "qv": ["query", "value"]}}'


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, make_tiny_config):
    config = search_config(
        make_tiny_config,
        tmp_path,
        "search.n_trials=4",
        "search.pruner=none",
        f'search.space={{"lora.r": {{"choices": [4]}}, "lora.target_modules": {NO_LAYER}}}',
    )
    run_id, out = searched(config)
    frame = trials_frame(open_run_study(config, run_id), config)
    failed = frame[frame["state"] == "failed"]
    assert len(frame) == 4 and len(failed) >= 1
    assert set(frame.loc[failed.index, "lora.target_modules"]) == {"no_such_layer"}
    assert all("no_such_layer" in reason for reason in failed["reason"])
    assert out.trained.chosen["lora.target_modules"] == ["query", "value"]
    tags = Tracking.connect(config.tracking).client.get_run(run_id).data.tags
    assert tags["search.failed"] == str(len(failed))


def test_a_search_whose_every_trial_fails_ends_with_the_first_failure(tmp_path, make_tiny_config):
    config = search_config(
        make_tiny_config,
        tmp_path,
        "search.n_trials=2",
        'search.space.lora.target_modules={"choices": {"none": ["no_such_layer"]}}',  # the only key
    )
    with pytest.raises(TrainingError, match="none of the 2 trials completed.*no_such_layer"):
        searched(config)


class ThreadedDeployment:
    """Stands in for run_deployment and the Prefect client of flows/search.py: each trial flow
    run is the real `lora-train` flow in trial mode, on one of two worker threads."""

    def __init__(self, worker_dir: Path):
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.worker_dir, self.futures, self.calls = worker_dir, {}, []
        self.most_at_once = 0

    def run_deployment(self, name, parameters, timeout, flow_run_name, **kwargs):
        wire = json.loads(json.dumps(parameters))  # what crosses to a worker: plain JSON only
        self.calls.append(
            {"name": name, "timeout": timeout, "flow_run_name": flow_run_name, **wire}
        )
        run_id = uuid.uuid4()
        self.futures[run_id] = self.pool.submit(train_flow, **wire, output_dir=str(self.worker_dir))
        self.most_at_once = max(self.most_at_once, sum(not f.done() for f in self.futures.values()))
        return SimpleNamespace(id=run_id, name=f"trial-run-{len(self.calls)}")

    def read_flow_run(self, run_id):
        future = self.futures[run_id]
        if not future.done():
            state = Running()
        else:
            state = (
                Completed()
                if future.exception() is None
                else Failed(message=str(future.exception()))
            )
        return SimpleNamespace(id=run_id, name=str(run_id), state=state)

    def read_flow_runs(self, **kwargs):
        return []

    def set_flow_run_state(self, *args, **kwargs):
        raise AssertionError("no trial flow run is left to cancel")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_parallel_trials_through_the_gpu_deployment_share_one_study(
    tmp_path, make_tiny_config, monkeypatch
):
    config = search_config(
        make_tiny_config,
        tmp_path,
        "search.n_trials=4",
        "search.parallel=2",
        "train.deployment=lora-train/gpu",
    )
    fake = ThreadedDeployment(tmp_path / "worker")
    monkeypatch.setattr(search_flows, "run_deployment", fake.run_deployment)
    monkeypatch.setattr(search_flows, "get_client", lambda sync_client: fake)
    monkeypatch.setattr(search_flows, "POLL_S", 0.2)
    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until="prepare_data")
    trained = search_flows.trials_on_deployment  # the runner the retrain flow passes
    from tasks import stages

    result = stages.search(config, out.data, run_id, run_trials=trained)
    study = open_run_study(config, run_id)
    assert len(fake.calls) == 4 and all(c["trial"] for c in fake.calls)
    assert [c["flow_run_name"][-11:] for c in fake.calls] == [
        f"-search-{k:03d}" for k in range(1, 5)
    ]
    assert all(c["config"]["search"]["storage"].startswith("sqlite:///") for c in fake.calls)
    assert fake.most_at_once == 2
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # each trial recorded once
    assert all(t.state.is_finished() for t in study.trials)
    runs = {t.user_attrs[studies.RUN_ATTR] for t in study.trials}
    assert len(runs) == 4
    assert result.chosen and result.adapter.run_id == run_id


@pytest.mark.e2e
def test_a_killed_search_resumes_its_study_and_the_winner_is_registered(
    tmp_path, make_tiny_config, cli, prefect_api
):
    """SIGKILL while trial 3 trains; the re-run (same MLflow run) marks it interrupted, gives
    its budget back, runs the rest of the 6 trials and the pipeline to the registry."""
    config = search_config(make_tiny_config, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    args = ["run", "--config", str(path)]
    killed = cli.run(args, env={**env, KILL_AT_ENV: "search:trial3"}, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    tracking = Tracking.connect(config.tracking)
    [parent] = [
        r
        for r in tracking.client.search_runs([tracking.experiment_id])
        if MLFLOW_PARENT_RUN_ID not in r.data.tags
    ]
    assert parent.info.status == "RUNNING"

    resumed = cli.run(args, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert result["run_id"] == parent.info.run_id

    study = open_run_study(config, parent.info.run_id)
    interrupted = [t for t in study.trials if t.user_attrs.get(studies.INTERRUPTED)]
    assert [t.number for t in interrupted] == [3]
    counted = [t for t in study.trials if not t.user_attrs.get(studies.INTERRUPTED)]
    assert len(counted) == 6 and all(t.state.is_finished() for t in study.trials)
    drawn = [json.dumps(t.params, sort_keys=True) for t in study.trials]
    assert len(set(drawn)) == len(drawn)  # the re-run drew new trials, none twice
    runs = tracking.client.search_runs([tracking.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = {r.info.run_id: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags}
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert set(children) == {t.user_attrs[studies.RUN_ATTR] for t in study.trials}
    stale = children[interrupted[0].user_attrs[studies.RUN_ATTR]]
    assert stale.info.status == "KILLED" and stale.data.tags["search.state"] == "interrupted"

    version = tracking.client.get_model_version(result["model_name"], result["version"])
    best = studies.best_trial(study)
    assert version.tags["search.best_trial"] == str(best.number)
    assert version.tags["search.complete"] == str(
        sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    )
    assert version.tags["search.best.lora.r"] == str(best.params["lora.r"])
    report = Path(tracking.client.download_artifacts(result["run_id"], "promotion/report.md"))
    assert f"best trial {best.number}" in report.read_text()


def test_a_causal_lm_search_minimizes_validation_loss_over_decoder_layer_sets(tmp_path, demo_frame):
    """A tiny Llama, the decoder default space's layer sets: the study minimizes validation
    loss, and the winner's adapter wraps the layers its chosen set names."""
    import pandas as pd
    from test_causal_pipeline import causal_config_dict

    from tasks.common.config import config_from_dict
    from testkit.tiny import build_tiny_decoder

    frame = demo_frame.head(120)
    data = tmp_path / "pairs.csv"
    pd.DataFrame({"prompt": frame["text"], "response": "Team: " + frame["label"]}).to_csv(
        data, index=False
    )
    model_dir = build_tiny_decoder(tmp_path / "model", list(demo_frame["text"]), "llama")
    layers = config_from_dict(causal_config_dict(tmp_path, model_dir, data)).search.space[
        "lora.target_modules"
    ]  # the causal_lm default: attention, attention_mlp, all_linear
    tree = causal_config_dict(tmp_path, model_dir, data)
    tree["train"] |= {"epochs": 2, "checkpoint_steps": 0}
    tree["search"] = {
        "enabled": True,
        "n_trials": 3,
        "pruner": "none",
        "space": {"lora.r": {"choices": [4]}, "lora.target_modules": layers.model_dump()},
    }
    config = config_from_dict(tree)
    run_id, out = searched(config)
    study = open_run_study(config, run_id)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    best = studies.best_trial(study)
    assert best.value == min(t.value for t in study.trials if t.value is not None)
    assert (
        out.trained.chosen["lora.target_modules"]
        == layers.choices[best.params["lora.target_modules"]]
    )
    weights = Path(out.trained.adapter.local_path) / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as tensors:
        wrapped_mlp = any(".mlp." in key for key in tensors.keys())
    assert wrapped_mlp == (best.params["lora.target_modules"] != "attention")


def test_ties_go_to_the_trial_with_fewer_trainable_weights():
    study = optuna.create_study(direction="maximize")
    for value, weights in ((0.9, 1000), (0.9, 500), (0.8, 10)):
        study.add_trial(
            optuna.trial.create_trial(value=value, user_attrs={studies.PARAMS_ATTR: weights})
        )
    assert studies.best_trial(study).number == 1
    lower = optuna.create_study(direction="minimize")
    for value in (0.5, 0.3, 0.3):
        lower.add_trial(optuna.trial.create_trial(value=value))
    assert studies.best_trial(lower).number == 1  # equal size too: the earlier trial


def test_the_cli_refuses_a_bad_space_with_exit_2_naming_the_key(cli):
    result = cli.run(
        ["check-config", "--set", "search.space.train.learning_rate={low: 0.01, high: 0.001}"],
        timeout=120,
    )
    assert result.returncode == 2
    assert "search.space.train.learning_rate: inverted range" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_trial_flow_run_that_ends_without_telling_fails_its_trial_only(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    crashed, alive = study.ask(), study.ask()
    crashed.set_user_attr(studies.FLOW_RUN_ATTR, "run-a")
    alive.set_user_attr(studies.FLOW_RUN_ATTR, "run-b")
    ended = SimpleNamespace(id="run-a", name="r-search-001", state=Crashed(message="worker died"))
    search_flows.fail_untold(study, ended)
    first, second = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL
    assert (
        first.user_attrs[studies.FAIL_REASON] == "flow run r-search-001 ended Crashed: worker died"
    )
    assert second.state == optuna.trial.TrialState.RUNNING  # another flow run's trial goes on
    assert studies.counts(study).failed == 1 and studies.counts(study).running == 1
