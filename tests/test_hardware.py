"""What the CPU can do (flags, bf16 kernels, peak FLOP/s) and what the pipeline does with it."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorWithPadding

from lora_core.layers import LoraLinear
from tasks.classification.modeling import build_lora_model
from tasks.classification.serve_check import speedups
from tasks.classification.train import training_setup
from tasks.common.config import LoraSection, ModelConfig, PipelineConfig
from tasks.common.hardware import bf16_kernels, cpu_flags, flops_per_token, fmt_flops, peak_flops
from tasks.common.training import GuardedTrainer, token_lengths, training_arguments

SAPPHIRE_RAPIDS = """processor\t: 0
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
SKYLAKE = "cpu MHz\t\t: 3000.000\nflags\t\t: fpu sse avx2 fma avx512f\n"
GRAVITON = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16\n"
ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    "cpu MHz\t\t: 2600.000\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni\n"
)


def test_flags_and_bf16_kernels_per_cpu():
    assert "amx_bf16" in cpu_flags(SAPPHIRE_RAPIDS)
    assert bf16_kernels(cpu_flags(SAPPHIRE_RAPIDS)) == "amx_bf16"  # AMX before AVX512-BF16
    assert bf16_kernels({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert bf16_kernels(cpu_flags(SKYLAKE)) is None  # bf16 would be emulated: slower
    assert bf16_kernels(cpu_flags(GRAVITON)) is None  # ARM bf16 is not oneDNN's fast path here
    assert cpu_flags("no flags here") == set()


def test_peak_flops_from_clock_cores_and_instructions(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    amx = peak_flops(cpuinfo=SAPPHIRE_RAPIDS)
    assert (amx.cores, amx.clock_ghz) == (2, 2.6)
    assert amx.fp32 == pytest.approx(2 * 2.6e9 * 64)  # AVX-512: 2 FMA ports x 16 fp32 x 2
    assert amx.bf16 == pytest.approx(2 * 2.6e9 * 1024)  # AMX tiles
    assert amx.int8 == pytest.approx(2 * 2.6e9 * 2048)  # AMX-INT8
    assert amx.share(amx.fp32 / 4, "fp32") == pytest.approx(0.25)
    assert amx.share(amx.int8 / 2, "int8") == pytest.approx(0.5)
    avx512 = peak_flops(cpuinfo=SKYLAKE)
    assert avx512.fp32 == pytest.approx(2 * 3.0e9 * 64) and avx512.bf16 is None
    # no VNNI: onnxruntime's int8 kernels multiply with vpmaddubsw, AVX2's here (no avx512bw)
    assert avx512.int8 == pytest.approx(2 * 3.0e9 * 128)
    assert peak_flops(cpuinfo=SKYLAKE.replace("avx512f", "avx512f avx512bw")).int8 == (
        pytest.approx(2 * 3.0e9 * 256)
    )
    zen3 = peak_flops(cpuinfo=ZEN4.replace("avx512f avx512_bf16 avx512_vnni", ""))
    assert (zen3.fp32, zen3.bf16) == (pytest.approx(2 * 2.6e9 * 32), None)  # AVX2, full width
    assert zen3.int8 == pytest.approx(2 * 2.6e9 * 128)
    assert (fmt_flops(zen3.bf16), fmt_flops(zen3.fp32)) == ("unknown", "166 GFLOP/s")
    assert avx512.share(1e9, "bf16") is None
    unknown = peak_flops(cpuinfo="")
    assert unknown.fp32 is None and unknown.share(1e9, "fp32") is None
    assert unknown.clock_text == "an unknown clock"
    odd = peak_flops(cpuinfo=SAPPHIRE_RAPIDS.replace("2600.000", "2599.998"))
    assert odd.clock_text == "2.60 GHz"  # not 2.5999980000000003
    # AMD Zen 4 runs AVX-512 as two 256-bit halves: half the AVX-512 rates (this project's CI
    # machine is one); Intel's and other families' figures are the table's
    zen4 = peak_flops(cpuinfo=ZEN4)
    assert zen4.fp32 == pytest.approx(2 * 2.6e9 * 32)
    assert zen4.bf16 == pytest.approx(2 * 2.6e9 * 64)
    assert zen4.int8 == pytest.approx(2 * 2.6e9 * 128)
    zen5 = peak_flops(cpuinfo=ZEN4.replace("cpu family\t: 25", "cpu family\t: 26"))
    assert zen5.fp32 == pytest.approx(2 * 2.6e9 * 64)


def test_flops_per_token_counts_linear_weights_and_attention():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2, "hidden_size": 8})()
            self.embed = torch.nn.Embedding(100, 8)  # a lookup: no FLOPs
            self.up = torch.nn.Linear(8, 32)
            self.down = torch.nn.Linear(32, 8)

    forward = 2 * (8 * 32 + 32 * 8) + 4 * 2 * 10 * 8
    assert flops_per_token(Tiny(), seq_len=10) == forward
    assert flops_per_token(Tiny(), seq_len=10, training=True) == 2 * forward


def test_token_lengths_read_from_arrow_follow_selections():
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [0, 1, 0]})
    assert token_lengths(rows).tolist() == [3, 1, 2]
    assert token_lengths(rows.select([2, 0])).tolist() == [2, 3]
    assert token_lengths(rows.select([])).tolist() == []


def test_bf16_on_cpu_autocasts_the_matmuls_and_keeps_fp32_master_weights(tmp_path, tiny_bert):
    model, _ = build_lora_model(
        ModelConfig(name_or_path=str(tiny_bert)), LoraSection(r=2), ["a", "b"]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    rows = tokenizer(["my card was charged twice", "where is my parcel"] * 8)
    data = Dataset.from_dict({**rows, "labels": [0, 1] * 8})
    seen = set()
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    layer.register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training else None)
    config = PipelineConfig.model_validate(
        {"data": {"path": "unused.csv"}, "train": {"max_steps": 3, "batch_size": 4}}
    )
    trainer = GuardedTrainer(
        model=model,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        args=training_arguments(config, tmp_path, "cpu", "bf16", evaluate=False),
    )
    trainer.train()
    assert seen == {torch.bfloat16}  # the matmuls ran in bf16
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}  # master weights
    assert any(not torch.equal(before[n], p) for n, p in trained.items())


def test_speedups_against_each_peer_that_was_timed():
    timings = {
        "serve/onnx.batch1_p50_ms": 2.0,
        "serve/onnx.batch32_per_second": 800.0,
        "serve/torch.batch1_p50_ms": 8.0,
        "serve/torch.batch32_per_second": 200.0,
    }
    assert speedups(timings, [32]) == {
        "serve/speedup.batch1_p50": 4.0,
        "serve/speedup.batch32_throughput": 4.0,
    }
    timings |= {"serve/torch_bf16.batch1_p50_ms": 5.0, "serve/torch_bf16.batch32_per_second": 400.0}
    assert speedups(timings, [32])["serve/speedup_vs_bf16.batch1_p50"] == 2.5
    assert speedups(timings, [32])["serve/speedup_vs_bf16.batch32_throughput"] == 2.0


def test_fp32_after_bf16_in_one_process_trains_in_fp32(tmp_path, tiny_bert):
    """TrainingArguments keeps a stale ACCELERATE_MIXED_PRECISION=bf16 from an earlier bf16
    training; ours sets it for every training, so fp32 means fp32 (and ranks inherit it)."""
    from transformers import Trainer

    model, _ = build_lora_model(
        ModelConfig(name_or_path=str(tiny_bert)), LoraSection(r=2), ["a", "b"]
    )
    config = PipelineConfig.model_validate({"data": {"path": "unused.csv"}})
    training_arguments(config, tmp_path / "bf16", "cpu", "bf16", evaluate=False)
    args = training_arguments(config, tmp_path / "fp32", "cpu", "fp32", evaluate=False)
    assert Trainer(model=model, args=args).accelerator.mixed_precision == "no"
    args = training_arguments(config, tmp_path / "bf16", "cpu", "bf16", evaluate=False)
    assert Trainer(model=model, args=args).accelerator.mixed_precision == "bf16"


@pytest.mark.parametrize("precision, width", [("bf16", 8), ("fp32", 6)])
def test_half_precision_batches_pad_to_a_multiple_of_8(tmp_path, tiny_bert, precision, width):
    """bf16/fp16 batches pad to a multiple of 8 (oneDNN builds a kernel per new shape on CPU,
    tensor cores want it on GPU); fp32 batches pad to their longest text."""
    (tmp_path / "label_names.json").write_text(json.dumps(["a", "b"]))
    config = PipelineConfig.model_validate(
        {
            "data": {"path": "unused.csv"},
            "model": {"name_or_path": str(tiny_bert)},
            "train": {"precision": precision, "device": "cpu"},
        }
    )
    setup = training_setup(config, tmp_path)
    rows = [{"input_ids": [101] + [1000] * n + [102], "labels": 0} for n in (2, 4)]
    batch = setup.collator(rows)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum() == 10
