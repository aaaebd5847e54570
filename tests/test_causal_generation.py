"""Generation and scoring helpers (tasks/causal/generation.py) and the causal-LM pyfunc model.

A tiny random Llama (ChatML template) and GPT-2 (no template: a simple one is set) are built
and exported to ONNX once per session; PyTorch and onnxruntime must agree token for token.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.causal.generation import (
    IGNORE_INDEX,
    decode,
    first_step_logits,
    greedy_new_tokens,
    pad_id,
    perplexity,
    response_nll,
    token_agreement,
)
from tasks.causal.onnx_causal_lm import OnnxCausalLM
from testkit.tiny import build_tiny_decoder

ROOT = Path(__file__).resolve().parents[1]
SERVING_CODE = ROOT / "tasks" / "causal" / "onnx_causal_lm.py"
SIMPLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
QUESTIONS = [
    "I was charged twice for my order",
    "How do I reset my password?",
    "The app crashes when I open settings",
]


@dataclass
class Decoder:
    family: str
    tokenizer: object  # from the served folder: chat template included
    torch_model: object
    ort_model: object
    served_dir: Path  # ONNX export + tokenizer + serving.json, as the pipeline ships it

    def render(self, question: str) -> str:
        conversation = [{"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def decoder(request, tmp_path_factory, demo_frame) -> Decoder:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family = request.param
    root = tmp_path_factory.mktemp(f"causal-{family}")
    model_dir = build_tiny_decoder(root / "model", list(demo_frame["text"]), family)
    served = root / "served"
    main_export(
        str(model_dir),
        str(served),
        task="text-generation-with-past",
        do_validation=False,
        local_files_only=True,
    )
    (served / "model.onnx").rename(served / "model_served.onnx")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SIMPLE_TEMPLATE
    tokenizer.save_pretrained(str(served))
    spec = {
        "task": "causal_lm",
        "model_file": "model_served.onnx",
        "max_new_tokens": 64,
        "device": "cpu",
        "variant": "fp32",
    }
    (served / "serving.json").write_text(json.dumps(spec))
    torch_model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ort_model = ORTModelForCausalLM.from_pretrained(str(served), file_name="model_served.onnx")
    return Decoder(
        family, AutoTokenizer.from_pretrained(str(served)), torch_model, ort_model, served
    )


@pytest.fixture(scope="session")
def served_model(decoder) -> OnnxCausalLM:
    return OnnxCausalLM.from_folder(decoder.served_dir)


def _examples(decoder: Decoder) -> list[dict]:
    """Prompt + response token ids; labels IGNORE_INDEX on the prompt (different lengths)."""
    responses = ["Please check your billing page.", "Reset it from the login screen", "Sorry!"]
    examples = []
    for question, response in zip(QUESTIONS, responses, strict=True):
        tok = decoder.tokenizer
        prompt = tok(decoder.render(question), add_special_tokens=False)["input_ids"]
        answer = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append(
            {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}
        )
    return examples


def _by_hand(model, example: dict) -> tuple[float, int]:
    """Cross-entropy (sum) of one unpadded example over its response tokens."""
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    loss = torch.nn.functional.cross_entropy(
        logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(loss), int((labels[1:] != IGNORE_INDEX).sum())


def test_greedy_tokens_torch_equal_onnx(decoder):
    prompts = [decoder.render(q) for q in QUESTIONS]
    torch_ids = greedy_new_tokens(decoder.torch_model, decoder.tokenizer, prompts, 32, 32)
    ort_ids = greedy_new_tokens(decoder.ort_model, decoder.tokenizer, prompts, 32, 32)
    assert [len(ids) for ids in torch_ids] == [32, 32, 32]
    assert ort_ids == torch_ids
    assert token_agreement(torch_ids, ort_ids) == 1.0
    assert len({tuple(ids) for ids in torch_ids}) > 1  # answers depend on the prompt
    again = greedy_new_tokens(decoder.torch_model, decoder.tokenizer, prompts[:1], 32, 32)
    assert again == torch_ids[:1]  # deterministic


def test_greedy_tokens_stop_at_eos_without_min(decoder):
    eos = decoder.tokenizer.eos_token_id
    prompts = [decoder.render(q) for q in QUESTIONS]
    for ids in greedy_new_tokens(decoder.torch_model, decoder.tokenizer, prompts, 48):
        assert 1 <= len(ids) <= 48
        assert eos not in ids[:-1]  # generation ends at the first eos


def test_generation_config_eos_list_and_sampling_defaults(decoder, tmp_path):
    """A generation_config.json eos list ends answers; its sampling settings never apply."""
    tok = decoder.tokenizer
    prompt = decoder.render(QUESTIONS[0])
    natural = greedy_new_tokens(decoder.torch_model, tok, [prompt], 16)[0]
    assert tok.eos_token_id not in natural  # random weights: no eos within 16 tokens
    stop = natural[5]
    k = natural.index(stop)
    extra = {"eos_token_id": [tok.eos_token_id, stop], "do_sample": True, "temperature": 5.0}

    model = copy.deepcopy(decoder.torch_model)
    for key, value in extra.items():
        setattr(model.generation_config, key, value)
    torch.manual_seed(1)
    assert greedy_new_tokens(model, tok, [prompt], 16) == [natural[: k + 1]]
    forced = greedy_new_tokens(model, tok, [prompt], 16, min_new_tokens=16)[0]
    assert len(forced) == 16 and stop not in forced  # min_new_tokens suppresses every eos id

    folder = tmp_path / "served"
    shutil.copytree(decoder.served_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **extra}))
    [answer] = OnnxCausalLM.from_folder(folder).answer(
        [[{"role": "user", "content": QUESTIONS[0]}]]
    )
    assert answer == {
        "text": decode(tok, natural[: k + 1]),
        "new_tokens": k + 1,
        "finish_reason": "eos",
    }


def test_pad_id_falls_back_to_eos():
    from types import SimpleNamespace

    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=50256)) == 50256  # GPT-2
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0


def test_response_nll_matches_hand_computation_and_onnx(decoder):
    examples = _examples(decoder)
    nll, count = response_nll(decoder.torch_model, examples, batch_size=2)
    by_hand = [_by_hand(decoder.torch_model, e) for e in examples]
    assert (
        count
        == sum(c for _, c in by_hand)
        == sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples)
    )
    assert nll == pytest.approx(sum(n for n, _ in by_hand), rel=1e-6)
    one_nll, one_count = response_nll(decoder.torch_model, examples[:1], batch_size=1)
    assert (one_nll, one_count) == pytest.approx(by_hand[0], rel=1e-6)
    single = [response_nll(decoder.torch_model, [e], 1) for e in examples]
    assert nll == pytest.approx(sum(n for n, _ in single), rel=1e-6)  # right padding is inert

    ort_nll, ort_count = response_nll(decoder.ort_model, examples, batch_size=3)
    assert ort_count == count
    assert ort_nll == pytest.approx(nll, rel=1e-4)
    assert perplexity(nll, count) == pytest.approx(math.exp(nll / count))
    assert perplexity(0.0, 0) == math.inf


def test_response_nll_scores_response_tokens_only(decoder):
    example = _examples(decoder)[0]
    nll, count = response_nll(decoder.torch_model, [example], 1)
    prompt_len = example["labels"].index(next(x for x in example["labels"] if x != IGNORE_INDEX))
    # another prompt (labels still IGNORE_INDEX there) changes the context, not what is scored
    first = dict(example, labels=[example["input_ids"][0]] + example["labels"][1:])
    assert response_nll(decoder.torch_model, [first], 1) == (nll, count)  # labels[0]: no target
    # a prompt position given its label is scored: one more token, more loss
    scored = list(example["labels"])
    scored[prompt_len - 1] = example["input_ids"][prompt_len - 1]
    more_nll, more_count = response_nll(decoder.torch_model, [dict(example, labels=scored)], 1)
    assert more_count == count + 1
    assert more_nll > nll
    # response-label change: same count, different loss
    wrong = list(example["labels"])
    wrong[-1] = (wrong[-1] + 1) % len(decoder.tokenizer)
    wrong_nll, wrong_count = response_nll(decoder.torch_model, [dict(example, labels=wrong)], 1)
    assert wrong_count == count and wrong_nll != pytest.approx(nll)


def test_first_step_logits_parity(decoder):
    prompts = [decoder.render(q) for q in QUESTIONS]
    torch_logits = first_step_logits(decoder.torch_model, decoder.tokenizer, prompts)
    ort_logits = first_step_logits(decoder.ort_model, decoder.tokenizer, prompts)
    for prompt, a, b in zip(prompts, torch_logits, ort_logits, strict=True):
        n = len(decoder.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert a.shape == b.shape == (n, len(decoder.tokenizer))
        assert a.dtype == b.dtype == np.float32
        assert float(np.abs(a - b).max()) < 1e-4


def test_token_agreement_on_crafted_lists():
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 9, 9]]) == 0.5
    assert token_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5  # missing positions disagree
    assert token_agreement([[1, 2]], [[1, 2, 3, 4]]) == 1.0  # scored over the reference
    assert token_agreement([[1, 2, 3], [4]], [[1, 0, 3], []]) == 0.5  # pooled over positions
    assert token_agreement([[]], [[]]) == 1.0
    with pytest.raises(ValueError):
        token_agreement([[1]], [[1], [2]])


def test_pyfunc_answers_equal_torch_greedy(decoder, served_model):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    answers = served_model.answer(conversations)
    prompts = [decoder.render(q) for q in QUESTIONS]
    expected = greedy_new_tokens(decoder.torch_model, decoder.tokenizer, prompts, 64)
    assert [a["text"] for a in answers] == [decode(decoder.tokenizer, ids) for ids in expected]
    assert [a["new_tokens"] for a in answers] == [len(ids) for ids in expected]
    eos = decoder.tokenizer.eos_token_id
    reasons = ["eos" if ids[-1] == eos else "length" for ids in expected]
    assert [a["finish_reason"] for a in answers] == reasons


def test_pyfunc_predict_input_forms(served_model):
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    by_prompt = served_model.predict(None, pd.DataFrame({"prompt": QUESTIONS}))
    assert list(by_prompt.columns) == ["text", "new_tokens", "finish_reason"]
    assert len(by_prompt) == len(QUESTIONS)
    by_list = served_model.predict(None, pd.DataFrame({"messages": messages}))
    by_json = served_model.predict(
        None, pd.DataFrame({"messages": [json.dumps(m) for m in messages]})
    )
    by_strings = served_model.predict(None, QUESTIONS)
    for frame in (by_list, by_json, by_strings):
        pd.testing.assert_frame_equal(frame, by_prompt)
    one = served_model.predict(None, QUESTIONS[1])
    pd.testing.assert_frame_equal(one, by_prompt.iloc[[1]].reset_index(drop=True))
    with pytest.raises(ValueError, match="messages"):
        served_model.predict(None, pd.DataFrame({"question": QUESTIONS}))


def test_pyfunc_max_new_tokens_param(decoder, served_model):
    short = served_model.predict(
        None, pd.DataFrame({"prompt": QUESTIONS}), params={"max_new_tokens": 3}
    )
    prompts = [decoder.render(q) for q in QUESTIONS]
    expected = greedy_new_tokens(decoder.torch_model, decoder.tokenizer, prompts, 3)
    eos = decoder.tokenizer.eos_token_id
    assert list(short["new_tokens"]) == [len(ids) for ids in expected]
    assert (short["new_tokens"] <= 3).all()
    assert list(short["text"]) == [decode(decoder.tokenizer, ids) for ids in expected]
    for row, ids in zip(short.to_dict("records"), expected, strict=True):
        assert row["finish_reason"] == ("eos" if ids[-1] == eos else "length")
    assert "length" in set(short["finish_reason"])  # 3 tokens, no eos: cut by the limit


def test_pyfunc_through_mlflow(decoder, served_model, tmp_path):
    """Logged from code, loaded back: the same answers as in-process, params pass through."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    from tasks.common.config import TrackingConfig
    from tasks.common.tracking import Tracking

    folder = tmp_path / "model_dir"
    shutil.copytree(decoder.served_dir, folder)
    messages = Array(Object([Property("role", "string"), Property("content", "string")]))
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec(messages, "messages", required=False),
                ColSpec("string", "prompt", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )
    store = TrackingConfig(
        uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="causal-pyfunc",
        artifact_location=(tmp_path / "artifacts").as_uri(),
    )
    with Tracking.connect(store).fluent():
        experiment = mlflow.create_experiment(
            "causal", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_CODE),
                artifacts={"model_dir": str(folder)},
                signature=signature,
                pip_requirements=["mlflow"],
            )
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        frame = pd.DataFrame({"prompt": QUESTIONS})
        expected = served_model.predict(None, frame)
        pd.testing.assert_frame_equal(loaded.predict(frame), expected)
        conversations = pd.DataFrame(
            {"messages": [[{"role": "user", "content": q}] for q in QUESTIONS]}
        )
        pd.testing.assert_frame_equal(loaded.predict(conversations), expected)
        short = loaded.predict(frame, params={"max_new_tokens": 3})
        pd.testing.assert_frame_equal(
            short, served_model.predict(None, frame, params={"max_new_tokens": 3})
        )
        assert (short["new_tokens"] <= 3).all()
