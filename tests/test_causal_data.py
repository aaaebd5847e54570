"""causal_lm data: chat templates, response-only labels (exact ids), truncation, packing, errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from tasks.causal.formatting import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    FormatError,
    conversation,
    encode,
    ensure_chat_template,
    pack,
    render_prompt,
    segments,
)
from testkit.tiny import build_tiny_decoder

USER_ONLY = [{"role": "user", "content": "Where is my parcel?"}]
EXCHANGE = [*USER_ONLY, {"role": "assistant", "content": "Team: shipping"}]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, demo_frame):
    return build_tiny_decoder(tmp_path_factory.mktemp("llama"), list(demo_frame["text"]), "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, demo_frame):
    return build_tiny_decoder(tmp_path_factory.mktemp("gpt2"), list(demo_frame["text"]), "gpt2")


@pytest.fixture
def chatml(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    assert ensure_chat_template(tokenizer) is False  # its own template is kept
    return tokenizer


@pytest.fixture
def plain(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    assert ensure_chat_template(tokenizer) is True  # had none: the default applies
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_chat_template_renders_the_prompt(chatml):
    assert render_prompt(chatml, USER_ONLY) == (
        "<|im_start|>user\nWhere is my parcel?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_template_when_the_tokenizer_has_none(plain):
    assert plain.chat_template == DEFAULT_CHAT_TEMPLATE
    assert render_prompt(plain, USER_ONLY) == "### User:\nWhere is my parcel?\n\n### Assistant:\n"
    assert segments(plain, EXCHANGE)[-1] == ("Team: shipping</s>\n\n", True)


def test_labels_mask_the_prompt_exactly(chatml):
    prompt_ids = ids(chatml, render_prompt(chatml, USER_ONLY))
    response_ids = ids(chatml, "Team: shipping<|im_end|>\n")
    example = encode(chatml, EXCHANGE, max_length=512)
    assert example.input_ids == prompt_ids + response_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert response_ids[-2] == chatml.convert_tokens_to_ids("<|im_end|>")  # learns to stop
    assert not example.truncated


def test_every_assistant_turn_is_trained_and_nothing_else(chatml):
    messages = [
        {"role": "system", "content": "Route tickets."},
        {"role": "user", "content": "Card charged twice"},
        {"role": "assistant", "content": "Team: billing"},
        {"role": "user", "content": "And my password?"},
        {"role": "assistant", "content": "Team: account"},
    ]
    example = encode(chatml, messages, max_length=512)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    assert chatml.decode(trained) == "Team: billing<|im_end|>\nTeam: account<|im_end|>\n"
    assert example.labels == [
        t if label >= 0 else IGNORE_INDEX
        for t, label in zip(example.input_ids, example.labels, strict=True)
    ]


def test_template_that_rewrites_earlier_turns_is_refused(chatml):
    chatml.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(FormatError, match="renders earlier turns differently"):
        segments(chatml, EXCHANGE)


def test_truncation_cuts_at_max_length(chatml):
    full = encode(chatml, EXCHANGE, max_length=512)
    cut = encode(chatml, EXCHANGE, max_length=len(full.input_ids) - 2)
    assert cut.truncated and cut.input_ids == full.input_ids[:-2]
    assert cut.labels == full.labels[:-2]
    prompt_only = encode(chatml, EXCHANGE, max_length=3)
    assert prompt_only.trained_tokens == 0


def test_records_become_conversations():
    assert conversation({"prompt": "Q", "response": "A"}, "prompt", "response", "messages") == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    as_json = json.dumps(EXCHANGE)
    assert conversation({"messages": as_json}, "prompt", "response", "messages") == EXCHANGE
    for bad, message in [
        ([{"role": "robot", "content": "x"}], "role one of"),
        (USER_ONLY, "last message must be the assistant"),
        ([{"role": "user", "content": " "}, EXCHANGE[1]], "empty or non-text"),
        ("not json", "not valid JSON"),
    ]:
        with pytest.raises(FormatError, match=message):
            conversation({"messages": bad}, "prompt", "response", "messages")


def test_packing_keeps_examples_whole_and_apart(chatml):
    texts = ["a b", "card charged twice and again", "x", "where is my parcel, it is late now"]
    examples = [
        encode(chatml, [{"role": "user", "content": t}, EXCHANGE[1]], 64) for t in texts * 3
    ]
    rows = pack(examples, max_length=64, pad_id=chatml.pad_token_id)
    assert all(
        len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == 64 for r in rows
    )
    assert len(rows) < len(examples)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [64]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
            assert row["position_ids"][a:b] == list(range(b - a))
            pieces.append(tuple(row["input_ids"][a:b]))
    whole = Counter(tuple(e.input_ids) for e in examples)
    padding = [p for p in pieces if p not in whole]
    assert Counter(p for p in pieces if p in whole) == whole  # each example once, unsplit
    assert all(set(p) == {chatml.pad_token_id} for p in padding)
    trained = sum(label >= 0 for r in rows for label in r["labels"])
    assert trained == sum(e.trained_tokens for e in examples)  # response tokens all kept


def test_packed_rows_do_not_attend_across_examples(llama_dir, chatml):
    from tasks.causal.modeling import build_causal_lora_model
    from tasks.common.config import LoraSection, ModelConfig

    model, _ = build_causal_lora_model(
        ModelConfig(name_or_path=str(llama_dir)),
        LoraSection(target_modules="all-linear", modules_to_save=[]),
    )
    examples = [encode(chatml, [{"role": "user", "content": t}, EXCHANGE[1]], 48) for t in "ab"]
    (row,) = pack(examples, max_length=48, pad_id=chatml.pad_token_id)
    model.eval()
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
        ).logits[0]
        start = 0
        for example in examples:
            end = start + len(example.input_ids)
            alone = model(input_ids=torch.tensor([example.input_ids])).logits[0]
            assert torch.allclose(packed[start:end], alone, atol=1e-5)
            start = end


# ---------------------------------------------------------------------------------------------
# the prepare_data stage on files


def causal_config(tmp_path, model_dir, data_path, **data):
    from tasks.common.config import config_from_dict

    return config_from_dict(
        {
            "task": "causal_lm",
            "data": {"path": str(data_path), "max_length": 96, **data},
            "model": {"name_or_path": str(model_dir)},
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": (tmp_path / "artifacts").as_uri(),
            },
            "output_dir": str(tmp_path / "outputs"),
        }
    )


def prompt_response_csv(path, demo_frame, n=60):
    frame = demo_frame.head(n)
    table = pd.DataFrame({"prompt": frame["text"], "response": "Team: " + frame["label"]})
    table.loc[len(table)] = [None, "Team: x"]  # blank prompt: dropped and counted
    table.loc[len(table)] = [frame["text"].iloc[0], "Team: again"]  # repeated prompt
    table.to_csv(path, index=False)
    return path


def test_prepare_causal_data_splits_masks_and_packs(tmp_path, llama_dir, demo_frame):
    from conftest import tracked

    from tasks.causal.data import load_data_tokenizer, load_split
    from tasks.common.tracking import start_pipeline_run
    from tasks.stages import prepare_data

    path = prompt_response_csv(tmp_path / "pairs.csv", demo_frame)
    config = causal_config(tmp_path, llama_dir, path, packing=True)
    run_id = start_pipeline_run(config)
    data = prepare_data(config, run_id)
    stage = tracked(config, run_id).stage
    assert data.dropped["blank"] == 1 and data.dropped["duplicates"] == 1
    assert sum(data.rows.values()) == 60
    assert not (stage.fetch(data.dataset) / "label_names.json").exists()  # no classes here
    train, test = load_split(stage, data, "train"), load_split(stage, data, "test")
    assert set(train.column_names) == {"input_ids", "labels", "position_ids"}
    assert all(len(ids) == 96 for ids in train["input_ids"])
    row = test[0]
    tokenizer = load_data_tokenizer(stage, data)
    messages = json.loads(row["messages"])
    assert row["prompt"] == render_prompt(tokenizer, messages)
    assert row["reference"].startswith("Team: ")
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0]
    assert tokenizer.decode(trained) == row["reference"] + "<|im_end|>\n"


def test_prepare_causal_data_reads_chat_jsonl_and_saves_the_default_template(
    tmp_path, gpt2_dir, demo_frame
):
    from conftest import tracked

    from tasks.causal.data import load_data_tokenizer
    from tasks.common.tracking import start_pipeline_run
    from tasks.stages import prepare_data

    path = tmp_path / "chats.jsonl"
    with path.open("w") as out:
        for text, label in zip(demo_frame["text"][:40], demo_frame["label"][:40], strict=True):
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
            out.write(json.dumps({"messages": messages}) + "\n")
    config = causal_config(tmp_path, gpt2_dir, path)
    run_id = start_pipeline_run(config)
    data = prepare_data(config, run_id)
    tokenizer = load_data_tokenizer(tracked(config, run_id).stage, data)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert sum(data.rows.values()) == 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "answer": "a"}\n', "neither columns 'prompt' and 'response' nor"),
        ('{"messages": [{"role": "bot", "content": "a"}]}\n', "record 1: message 0 must be"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', "record 1: the last message"),
    ],
)
def test_bad_records_are_clear_errors(tmp_path, llama_dir, content, message):
    from tasks.causal.data import build_conversation_splits
    from tasks.common.errors import DataError

    path = tmp_path / "bad.jsonl"
    path.write_text(content * 3)
    config = causal_config(tmp_path, llama_dir, path)
    with pytest.raises(DataError, match=message) as info:
        build_conversation_splits(config.data)
    assert str(path) in str(info.value)


def test_prompts_longer_than_max_length_are_an_error(tmp_path, llama_dir, demo_frame):
    from tasks.common.errors import DataError
    from tasks.common.tracking import start_pipeline_run
    from tasks.stages import prepare_data

    path = prompt_response_csv(tmp_path / "pairs.csv", demo_frame)
    config = causal_config(tmp_path, llama_dir, path)
    config.data.max_length = 8
    with pytest.raises(DataError, match="raise data.max_length"):
        prepare_data(config, start_pipeline_run(config))


def test_gpu_config_file_is_valid_and_targets_attention_and_mlp():
    from pathlib import Path

    from tasks.common.config import load_config
    from tasks.common.models import resolve_model_path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "causal_lm.yaml")
    assert config.task == "causal_lm" and config.train.gradient_checkpointing
    assert config.lora.target_modules == "all-linear" and config.lora.modules_to_save == []
    assert resolve_model_path(config.model.name_or_path) == "Qwen/Qwen2.5-0.5B-Instruct"  # hub id


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("mistral", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gpt2", {"c_attn", "c_proj", "c_fc"}),
    ],
)
def test_default_lora_targets_are_the_attention_and_mlp_projections(family, expected):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_core import inject_lora
    from tasks.common.config import config_from_dict
    from tasks.common.models import lora_config

    sizes = (
        {"n_embd": 32, "n_layer": 2, "n_head": 4}
        if family == "gpt2"
        else {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=100, **sizes))
    defaults = config_from_dict({"task": "causal_lm", "data": {"path": "x"}}).lora
    report = inject_lora(model, lora_config(defaults))
    assert {name.rsplit(".", 1)[1] for name in report.target_names} == expected
    assert not any("lm_head" in name for name in report.target_names)


def test_a_template_that_rejects_a_record_is_a_clear_error(tmp_path, llama_dir, demo_frame):
    """Templates may raise (e.g. Mistral's on a system turn): the error names the example."""
    from transformers import AutoTokenizer

    from tasks.common.errors import DataError
    from tasks.common.tracking import start_pipeline_run
    from tasks.stages import prepare_data

    model_dir = tmp_path / "strict"
    shutil.copytree(llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    tokenizer.save_pretrained(model_dir)
    path = tmp_path / "chats.jsonl"
    record = {"messages": [{"role": "system", "content": "Be brief."}, *EXCHANGE]}
    path.write_text(json.dumps(record) + "\n" + json.dumps({"messages": EXCHANGE}) + "\n")
    config = causal_config(tmp_path, model_dir, path)
    config.data.split.validation = 0.0
    config.data.split.test = 0.5
    with pytest.raises(DataError, match="cannot be formatted with the chat template") as info:
        prepare_data(config, start_pipeline_run(config))
    assert "system messages are not supported" in str(info.value)


def test_a_test_split_emptied_by_leakage_is_an_error(tmp_path, llama_dir):
    from tasks.causal.data import build_conversation_splits
    from tasks.common.errors import DataError

    folder = tmp_path / "splits"
    folder.mkdir()
    lines = [json.dumps({"prompt": f"question {i}", "response": f"answer {i}"}) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:2]) + "\n")  # all seen in train
    config = causal_config(tmp_path, llama_dir, folder)
    config.data.split.validation = 0.0
    with pytest.raises(DataError, match="the test split is empty after cleaning"):
        build_conversation_splits(config.data)
