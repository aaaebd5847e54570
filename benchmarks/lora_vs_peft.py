"""lora_core vs PEFT on the packaged MiniLM: step time, step memory, merge time, train throughput.

One process, both engines side by side, repetitions interleaved (A B B A ...) after a warm-up, a
fixed torch thread count and fixed seeds. Every ratio is lora_core / peft (step time, memory,
merge time: lower is better; tokens per second: higher is better).

What is measured
----------------
1. Training step (`step_time_ratio_dropout*`): the packaged MiniLM as BertForSequenceClassification
   with one output per demo label, LoRA from configs/default.yaml (r=8, alpha=16, query/key/value/
   dense, classifier in modules_to_save), once with lora dropout 0 and once with 0.1. lora_core
   (`inject_lora`) and PEFT (`get_peft_model`, an equivalent `peft.LoraConfig`, task_type SEQ_CLS)
   start from the same base weights, and PEFT gets lora_core's LoRA weights, so both compute the
   same function (checked: eval logits must agree to 1e-5). model.train(); one step is
   forward + backward + AdamW step + zero_grad(set_to_none=True) on real tokenized demo training
   texts, batch 16, dynamically padded (DataCollatorWithPadding). Both engines see the same
   batches; per batch the two run back to back, the order alternating. Reported: median step time
   per engine and, as the figure, the median of the per-batch ratios (robust to load that comes
   and goes; the ratio of the medians is printed next to it).
2. Memory (`peak_memory_ratio`): the peak of bytes allocated by torch's CPU allocator during one
   training step, above what was allocated when the step began (so: activations saved for
   backward, gradients, temporaries; the resident weights and AdamW state are excluded and shown
   apart). Read from torch.profiler(profile_memory=True): the running sum of the "[memory]"
   allocation/free events of the step, maximum taken, on the longest benchmark batches (the
   largest of those counts). Headline = max over dropout 0 and 0.1 of the per-setting ratio.
   Also shown: bytes of non-parameter tensors autograd saved for backward
   (torch.autograd.graph.saved_tensors_hooks, storages counted once).
3. Merge (`merge_time_ratio`): on fresh deep copies of the two models (copying is not timed),
   what the pipeline's merge stage does, `merge_lora(model, safe=True)` + `unload_lora(model)`,
   vs PEFT's `merge_and_unload(safe_merge=True)` (both check for inf/NaN before touching a
   weight). The unchecked variants (`merge_lora(safe=False)` + `unload_lora` vs
   `merge_and_unload()`) are shown too (`merge_time_ratio_unsafe`). Merged logits are compared.
   Figure: median of the per-repetition ratios (the two timed back to back, order alternating).
4. Training stage (`train_tokens_per_second_ratio`): real (non-pad, attention_mask == 1) tokens
   fed to the model / time spent training (from the first step to the end of the last) for
     A. our train stage: the model built as the stage builds it (training_attention, with_lora:
        LoRA and lora_core's dropout, the last layer on the pooled token) + Trainer with
        tasks.common.training.training_arguments (so group_by_length=True) +
        DataCollatorWithPadding (bf16: padded to a multiple of 8), evaluation switched off;
     B. plain PEFT + Trainer with default settings (random order, group_by_length=False,
        DataCollatorWithPadding), same epochs/steps, batch size, learning rate, warm-up, weight
        decay, seed and logging interval;
     C. (full run only) lora_core with B's settings, to split the gain into engine and batching
        (`train_tokens_per_second_ratio_same_settings` = C / B);
     D. (full run only) our train stage in fp32, to split off what precision auto gives (A runs
        under bf16 autocast on a CPU with AMX-BF16 or AVX512-BF16, fp32 elsewhere).
   After training (full run) each arm's model predicts the test split in fp32: test accuracy per
   arm, and A's minus B's in points (goal: within 0.5). Each arm's tokens/s is also shown as
   FLOP/s (tasks.common.hardware.flops_per_token, LoRA training) and as a share of this CPU's
   dense fp32 / bf16 peak.
   Each arm's Trainer.train() runs on the main thread of its own spawned process, the arms
   taking turns one optimizer step at a time (A B C C B A ...), each arm's time being the sum
   of its turns, so all arms see the same machine load. Quick run: arms A and B, 10 steps
   each; full run: the config's epochs.

The run also reports the share of CPU time other processes used meanwhile (from /proc/stat) and
warns above 10%: the timing ratios only mean something on an otherwise idle machine.

Run:  .venv/bin/python benchmarks/lora_vs_peft.py [--quick] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import (  # noqa: E402
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from lora_core import LoraConfig, inject_lora, lora_state_dict, merge_lora, unload_lora  # noqa: E402
from lora_core.peft_format import to_peft_fields  # noqa: E402
from tasks.classification.data import build_splits, check_labels, tokenize  # noqa: E402
from tasks.classification.modeling import first_token_last_layer, load_classifier  # noqa: E402
from tasks.common.config import PipelineConfig, load_config  # noqa: E402
from tasks.common.hardware import flops_per_token, fmt_flops, peak_flops  # noqa: E402
from tasks.common.models import (  # noqa: E402
    lora_config,
    resolve_model_path,
    training_attention,
    with_lora,
)
from tasks.common.training import (  # noqa: E402
    MIXED_PRECISION,
    MODEL_INPUTS,
    pad_multiple,
    pick_precision,
    training_arguments,
)

ENGINES = ("lora_core", "peft")


class CpuMeter:
    """Share of the machine's CPU time that other processes used while a section ran (Linux)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        mine = os.times()
        own = mine.user + mine.system + mine.children_user + mine.children_system
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own

    def foreign_share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        wall = end[0] - self.start[0]
        foreign = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, foreign / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------
# models and data


def build_pair(base: torch.nn.Module, cfg: LoraConfig, randomize_b: bool = False):
    """(lora_core model, peft model) on copies of `base`, holding identical LoRA/head weights."""
    ours = copy.deepcopy(base)
    inject_lora(ours, cfg)
    if randomize_b:  # a trained-looking adapter (B = 0 would make merging a no-op numerically)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**to_peft_fields(cfg), task_type="SEQ_CLS")
    )
    result = peft.set_peft_model_state_dict(theirs, lora_state_dict(ours))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"peft did not take keys {result.unexpected_keys[:5]}")
    return ours, theirs


def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, batch: dict) -> float:
    was = a.training, b.training
    a.eval()
    b.eval()
    with torch.no_grad():
        diff = (a(**batch).logits - b(**batch).logits).abs().max().item()
    a.train(was[0])
    b.train(was[1])
    return diff


def make_batches(train_rows, tokenizer, batch_size: int, n: int, seed: int) -> list[dict]:
    """n batches of real training examples in a seeded random order, each padded to its longest."""
    collate = DataCollatorWithPadding(tokenizer)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_rows), generator=g).tolist()
    batches = []
    for i in range(n):
        idx = [order[(i * batch_size + j) % len(order)] for j in range(batch_size)]
        batches.append(collate([train_rows[k] for k in idx]))
    return batches


# ---------------------------------------------------------------------------------------------
# 1. step time


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)


def time_steps(models: dict, batches: list[dict], warmup: int, passes: int) -> dict:
    """Interleaved timed steps: per batch both engines, order alternating every batch."""
    opts = {name: adamw(m) for name, m in models.items()}
    for m in models.values():
        m.train()
    for batch in batches[:warmup]:
        for name in ENGINES:
            train_step(models[name], opts[name], batch)
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    gc.collect()
    gc.disable()
    try:
        k = 0
        for _ in range(passes):
            for batch in batches:
                for name in ENGINES if k % 2 == 0 else ENGINES[::-1]:
                    t0 = time.perf_counter()
                    train_step(models[name], opts[name], batch)
                    times[name].append(time.perf_counter() - t0)
                k += 1
    finally:
        gc.enable()
    return {"times": times, "opts": opts}


# ---------------------------------------------------------------------------------------------
# 2. memory


def step_peak_bytes(model, opt, batch) -> int:
    """Peak bytes allocated during one train step above the level at its start (profiler)."""
    gc.collect()
    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, opt, batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted(
        (e["ts"], e["args"].get("Ev Idx", 0), int(e["args"]["Bytes"]))
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    )
    level = peak = 0
    for _, _, nbytes in mem:
        level += nbytes
        peak = max(peak, level)
    return peak


def saved_tensor_bytes(model, batch) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward (storages counted once)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def resident_bytes(model, opt) -> int:
    tensors = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in [*model.parameters(), *model.buffers()]
    }
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tensors[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(tensors.values())


# ---------------------------------------------------------------------------------------------
# 3. merge


def time_merges(ours, theirs, reps: int, check_batch: dict) -> dict:
    def ours_safe(m):
        merge_lora(m, safe=True)
        return unload_lora(m)

    def ours_unsafe(m):
        merge_lora(m, safe=False)
        return unload_lora(m)

    variants = {
        "safe": {"lora_core": ours_safe, "peft": lambda m: m.merge_and_unload(safe_merge=True)},
        "unsafe": {"lora_core": ours_unsafe, "peft": lambda m: m.merge_and_unload()},
    }
    sources = {"lora_core": ours, "peft": theirs}
    times = {v: {name: [] for name in ENGINES} for v in variants}
    merged_diff = None
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for variant, fns in variants.items():
            for name in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                fresh = copy.deepcopy(sources[name])
                gc.collect()
                t0 = time.perf_counter()
                plain = fns[name](fresh)
                dt = time.perf_counter() - t0
                if rep == 0 and variant == "safe":
                    if name == "lora_core":
                        merged_ours = plain
                    else:
                        merged_diff = max_logit_diff(merged_ours, plain, check_batch)
                elif rep > 0:
                    times[variant][name].append(dt)
                del fresh, plain
    return {"times": times, "merged_logit_diff": merged_diff}


# ---------------------------------------------------------------------------------------------
# 4. training stage throughput


class CountingCollator:
    """DataCollatorWithPadding that counts real (attention_mask) and padded tokens it hands out."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None) -> None:
        self.inner = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.real = 0
        self.padded = 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.padded += mask.numel()
        return batch


class TakeTurns(TrainerCallback):
    """One arm's side of the lockstep: before each of its turns (the first step, then every
    step after the last one it reported) it waits for the coordinator's "go"; after each step
    it reports the turn's seconds. The arm runs in its own process's main thread."""

    def __init__(self, conn) -> None:
        self.conn, self.since = conn, 0.0

    def _take(self) -> None:
        self.conn.recv()  # "go"
        self.since = time.perf_counter()

    def _give(self, kind: str) -> None:
        self.conn.send((kind, time.perf_counter() - self.since))

    def on_train_begin(self, args, state, control, **kwargs):
        self._take()

    def on_step_end(self, args, state, control, **kwargs):
        self._give("turn")
        self._take()

    def on_train_end(self, args, state, control, **kwargs):
        self._give("end")


def make_trainer(
    arm: str,
    config: PipelineConfig,
    dataset,
    tokenizer,
    label_names,
    out_dir: Path,
    max_steps: int | None,
):
    """Arm lora_core: our train stage's setup; peft: PEFT + Trainer defaults; lora_core_plain:
    lora_core with the peft arm's Trainer settings."""
    set_seed(config.train.seed)
    torch.manual_seed(0)  # the new head's init, as tasks.classification.modeling.build_lora_model
    precision = "fp32" if arm == "lora_core_fp32" else pick_precision(config.train, "cpu")
    stage_arm = arm in ("lora_core", "lora_core_fp32")  # our train stage's set-up
    options = training_attention(config.model, "cpu", precision) if stage_arm else {}
    model = load_classifier(resolve_model_path(config.model.name_or_path), label_names, **options)
    ours_args = training_arguments(config, out_dir / arm, "cpu", precision)
    # no eval set here, and no checkpoint writes inside the timed steps
    ours_args = dataclasses.replace(ours_args, eval_strategy="no", save_strategy="no")
    if max_steps:
        ours_args = dataclasses.replace(ours_args, max_steps=max_steps)
    plain_args = TrainingArguments(  # defaults, apart from what must match
        output_dir=str(out_dir / arm / "plain"),
        num_train_epochs=ours_args.num_train_epochs,
        max_steps=ours_args.max_steps,
        per_device_train_batch_size=ours_args.per_device_train_batch_size,
        learning_rate=ours_args.learning_rate,
        weight_decay=ours_args.weight_decay,
        warmup_ratio=ours_args.warmup_ratio,
        logging_steps=ours_args.logging_steps,
        seed=ours_args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    if arm == "peft":
        model = peft.get_peft_model(
            model, peft.LoraConfig(**to_peft_fields(lora_config(config.lora)), task_type="SEQ_CLS")
        )
        args = plain_args
    else:
        with_lora(model, config.lora)  # the stage's builder: LoRA and lora_core's dropout
        args = (
            dataclasses.replace(plain_args, label_names=["labels"])
            if arm == "lora_core_plain"
            else ours_args
        )
        if args is ours_args:  # our stage's model: as tasks.classification.train builds it
            first_token_last_layer(model)
    # The Trainer's accelerator takes its autocast from ACCELERATE_MIXED_PRECISION, which the
    # last TrainingArguments built wrote: say what this arm's arguments ask (until 2026-12-07
    # the "defaults" arms inherited our arm's bf16, so the fp32 baseline ran under bf16).
    os.environ["ACCELERATE_MIXED_PRECISION"] = MIXED_PRECISION.get(
        "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32", "no"
    )
    # our stage's collator pads half-precision batches to a multiple of 8 (kernels per shape)
    collator = CountingCollator(tokenizer, pad_multiple(precision) if args is ours_args else None)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    with trainer.accelerator.autocast():  # what the arm will really train under
        probe = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
    if (probe.dtype == torch.bfloat16) != args.bf16:
        raise SystemExit(f"arm {arm}: args say bf16={args.bf16} but autocast gives {probe.dtype}")
    return trainer, collator


def test_accuracy(model, test_split, tokenizer) -> float:
    """Share of the test split the trained model predicts right (fp32, eval mode)."""
    model.eval()
    collate = DataCollatorWithPadding(tokenizer)
    rows = [
        {k: test_split[i][k] for k in ("input_ids", "attention_mask")}
        for i in range(len(test_split))
    ]
    right = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            batch = collate(rows[start : start + 64])
            predicted = model(**batch).logits.argmax(-1)
            right += int(
                (predicted == torch.tensor(test_split["labels"][start : start + 64])).sum()
            )
    return right / len(rows)


def train_arm(arm, config, dataset, tokenizer, label_names, max_steps, test_split, threads, conn):
    """One arm in its own process (spawned): set up, say "ready", train in the turns the
    coordinator gives, then (outside the timed turns, while the others wait) score the test
    split and send the figures."""
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        trainer, collator = make_trainer(
            arm, config, dataset, tokenizer, label_names, Path(tmp), max_steps
        )
        trainer.add_callback(TakeTurns(conn))
        conn.send(("ready", 0.0))
        out = trainer.train()
        figures = {
            "steps": out.global_step,
            "loss": out.training_loss,
            "real_tokens": collator.real,
            "padded_tokens": collator.padded,
            "group_by_length": trainer.args.group_by_length,
            "precision": "bf16" if trainer.args.bf16 else "fp32",  # checked in make_trainer
        }
        if test_split is not None:
            figures["test_accuracy"] = test_accuracy(trainer.model, test_split, tokenizer)
        conn.send(("figures", figures))


def train_lockstep(
    arms: list[str],
    config: PipelineConfig,
    dataset,
    tokenizer,
    label_names,
    max_steps: int | None,
    test_split=None,
    threads: int = 2,
) -> dict:
    """Train every arm once, each in its own process, the arms taking turns one optimizer step
    at a time in the order A B C C B A A B C ... (so all see the same machine load), each
    arm's time the sum of its turns; tokens, seconds and (given a test split) test accuracy
    per arm.

    Processes, not threads of this one: torch's OpenMP parallel regions started from a
    thread other than the main one pay about 50 us each here (an element-wise add of 16 x 28
    x 384 floats: 10.5 us on the main thread, 70 on another), which slowed every arm by a
    third to two thirds until 2026-12-07 (our stage 20.0 s in a thread, 11.9 s on the main
    thread; PEFT's 28.0 and 21.4). The pipeline trains on the main thread (Prefect runs a
    flow's tasks there), so the benchmark does too."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = {}, []
    for arm in arms:
        ours, theirs = ctx.Pipe()
        args = (arm, config, dataset, tokenizer, label_names, max_steps, test_split, threads)
        proc = ctx.Process(target=train_arm, args=(*args, theirs), name=f"train-{arm}")
        proc.start()
        procs.append(proc)
        pipes[arm] = ours

    def receive(arm: str):
        if not pipes[arm].poll(3600):
            raise SystemExit(f"arm {arm}: no word for an hour")
        try:
            return pipes[arm].recv()
        except EOFError:
            code = procs[arms.index(arm)].exitcode
            raise SystemExit(f"arm {arm}: its process died (exit code {code})") from None

    try:
        for arm in arms:
            receive(arm)  # "ready": set-up done, not timed
        results = {arm: {"wall_s": 0.0} for arm in arms}
        pattern, active, pos = [*arms, *reversed(arms)], list(arms), 0
        while active:
            arm = pattern[pos % len(pattern)]
            pos += 1
            if arm not in active:
                continue
            pipes[arm].send("go")
            kind, seconds = receive(arm)
            results[arm]["wall_s"] += seconds
            if kind == "end":
                results[arm] |= receive(arm)[1]  # its test accuracy, while the others wait
                active.remove(arm)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    for figures in results.values():
        figures["tokens_per_s"] = figures["real_tokens"] / figures["wall_s"]
        figures["pad_share"] = 1 - figures["real_tokens"] / figures["padded_tokens"]
    return results


# ---------------------------------------------------------------------------------------------
# report


def print_physical_limit(model, train: dict, train_ds) -> None:
    """Training FLOPs per token (LoRA: forward + input gradients) and each arm's share of this
    CPU's dense peak in the precision it trained in."""
    mean_len = statistics.mean(len(ids) for ids in train_ds["input_ids"])
    per_token = flops_per_token(model, mean_len, training=True)
    peak = peak_flops()
    print(
        f"  physical limit: {per_token / 1e6:.1f} MFLOP per trained token (mean length "
        f"{mean_len:.0f}); {peak.cores} cores at {peak.clock_text}, dense peak fp32 "
        f"{fmt_flops(peak.fp32)}, bf16 {fmt_flops(peak.bf16)}"
    )
    for arm, t in train.items():
        achieved = t["tokens_per_s"] * per_token
        share = peak.share(achieved, t["precision"])
        print(
            f"  train arm {arm:<16} {achieved / 1e9:6.1f} GFLOP/s"
            + (f" = {share:.1%} of the {t['precision']} peak" if share else "")
        )


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def paired(a: list[float], b: list[float]) -> float:
    """Median of the per-pair ratios a[i] / b[i] (pairs measured back to back)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fmt_s(x: float) -> str:
    return f"{x * 1000:9.1f} ms"


def fmt_mb(x: float) -> str:
    return f"{x / 2**20:9.2f} MiB"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--quick", action="store_true", help="short run (about a minute)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (fixed)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    opts = ap.parse_args(argv)

    t_start = time.perf_counter()
    whole = CpuMeter()
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    set_seed(0)
    n_batches, passes, warmup, merge_reps = (6, 2, 2, 5) if opts.quick else (16, 3, 4, 20)
    train_arms = ["lora_core", "peft"]
    if not opts.quick:
        train_arms += ["lora_core_plain", "lora_core_fp32"]
    train_max_steps = 10 if opts.quick else None

    config = load_config(opts.config)
    if not Path(config.data.path).exists():  # relative to the repository, not the cwd
        config.data.path = str(ROOT / config.data.path)
    splits, _, _ = build_splits(config.data)
    label_names = check_labels(splits)
    dataset, tokenizer, _ = tokenize(splits, label_names, config)
    train_ds = dataset["train"].select_columns(
        [c for c in dataset["train"].column_names if c in MODEL_INPUTS]
    )
    rows = [train_ds[i] for i in range(len(train_ds))]
    batches = make_batches(rows, tokenizer, opts.batch_size, n_batches, seed=0)
    base_cfg = lora_config(config.lora)
    torch.manual_seed(0)
    base = load_classifier(resolve_model_path(config.model.name_or_path), label_names)
    lens = sorted(b["input_ids"].shape[1] for b in batches)
    print(
        f"lora_vs_peft: torch {torch.__version__}, peft {peft.__version__}, "
        f"threads {torch.get_num_threads()}, {'quick' if opts.quick else 'full'} run"
    )
    print(
        f"  model {type(base).__name__} ({len(label_names)} labels), LoRA r={base_cfg.r} "
        f"alpha={base_cfg.alpha:g} targets={base_cfg.target_modules} "
        f"modules_to_save={base_cfg.modules_to_save}"
    )
    print(
        f"  step/memory: {len(batches)} batches of {opts.batch_size} demo training texts, "
        f"padded lengths {lens[0]}..{lens[-1]}, {warmup} warm-up steps then {passes} passes, "
        f"engines alternating per batch",
        flush=True,
    )

    res: dict = {"step": {}, "memory": {}, "merge": {}, "train": {}, "foreign_cpu": {}}
    mem_batches = sorted(batches, key=lambda b: -b["input_ids"].shape[1])[:2]
    for dropout in (0.0, 0.1):
        meter = CpuMeter()
        cfg = dataclasses.replace(base_cfg, dropout=dropout)
        ours, theirs = build_pair(base, cfg)
        diff = max_logit_diff(ours, theirs, batches[0])
        if diff > 1e-5:
            raise SystemExit(f"lora_core and peft models differ (max logit diff {diff:g})")
        out = time_steps({"lora_core": ours, "peft": theirs}, batches, warmup, passes)
        times = out["times"]
        res["step"][dropout] = {
            "median_s": {n: statistics.median(times[n]) for n in ENGINES},
            "ratio_of_medians": ratio(
                statistics.median(times["lora_core"]), statistics.median(times["peft"])
            ),
            "paired_ratio": paired(times["lora_core"], times["peft"]),
            "logit_diff": diff,
        }
        res["foreign_cpu"][f"step_dropout{dropout:g}"] = meter.foreign_share()
        mem = {}
        for name, model in (("lora_core", ours), ("peft", theirs)):
            opt = out["opts"][name]
            mem[name] = {
                "step_peak": max(step_peak_bytes(model, opt, b) for b in mem_batches),
                "saved": saved_tensor_bytes(model, mem_batches[0]),
                "resident": resident_bytes(model, opt),
            }
        res["memory"][dropout] = mem
        del ours, theirs, out
        gc.collect()
        print(f"  step time, dropout {dropout:g}: done", flush=True)

    meter = CpuMeter()
    ours, theirs = build_pair(base, base_cfg, randomize_b=True)
    res["merge"] = time_merges(ours, theirs, merge_reps, batches[0])
    res["foreign_cpu"]["merge"] = meter.foreign_share()
    del ours, theirs
    gc.collect()
    length = f"{train_max_steps} steps" if train_max_steps else f"{config.train.epochs:g} epochs"
    print(
        f"  merge: done; training {', '.join(train_arms)} in lockstep ({length} each)", flush=True
    )

    meter = CpuMeter()
    res["train"] = train_lockstep(
        train_arms,
        config,
        train_ds,
        tokenizer,
        label_names,
        train_max_steps,
        None if opts.quick else dataset["test"],
        opts.threads,
    )
    res["foreign_cpu"]["train"] = meter.foreign_share()
    res["foreign_cpu"]["whole"] = whole.foreign_share()
    total = time.perf_counter() - t_start

    # ----- the table
    line = "-" * 100
    print()
    print(f"{'measure':<46}{'lora_core':>16}{'peft':>16}{'ratio':>10}  note")
    print(line)
    for dropout, s in res["step"].items():
        m = s["median_s"]
        print(
            f"{f'train step time, dropout {dropout:g}':<46}{fmt_s(m['lora_core']):>16}"
            f"{fmt_s(m['peft']):>16}{s['paired_ratio']:>10.3f}  "
            f"(ratio of medians {s['ratio_of_medians']:.3f})"
        )
    peak_ratios = {}
    for dropout, mem in res["memory"].items():
        a, b = mem["lora_core"], mem["peft"]
        peak_ratios[dropout] = ratio(a["step_peak"], b["step_peak"])
        print(
            f"{f'step peak allocation, dropout {dropout:g}':<46}{fmt_mb(a['step_peak']):>16}"
            f"{fmt_mb(b['step_peak']):>16}{peak_ratios[dropout]:>10.3f}"
        )
        print(
            f"{f'  saved for backward, dropout {dropout:g}':<46}{fmt_mb(a['saved']):>16}"
            f"{fmt_mb(b['saved']):>16}{ratio(a['saved'], b['saved']):>10.3f}"
        )
        print(
            f"{f'  resident weights + AdamW, dropout {dropout:g}':<46}"
            f"{fmt_mb(a['resident']):>16}{fmt_mb(b['resident']):>16}"
            f"{ratio(a['resident'], b['resident']):>10.3f}"
        )
    mt = res["merge"]["times"]
    merge_ratios = {}
    for variant in ("safe", "unsafe"):
        ma, mb = (statistics.median(mt[variant][n]) for n in ENGINES)
        merge_ratios[variant] = paired(mt[variant]["lora_core"], mt[variant]["peft"])
        print(
            f"{f'merge + unload ({variant})':<46}{fmt_s(ma):>16}{fmt_s(mb):>16}"
            f"{merge_ratios[variant]:>10.3f}  (ratio of medians {ratio(ma, mb):.3f})"
        )
    tr = res["train"]
    for arm, label in (
        ("lora_core", "our train stage"),
        ("lora_core_plain", "lora_core, Trainer defaults"),
        ("lora_core_fp32", "our train stage, fp32"),
    ):
        if arm in tr:
            print(
                f"{f'train tokens/s ({label})':<46}{tr[arm]['tokens_per_s']:>16.0f}"
                f"{tr['peft']['tokens_per_s']:>16.0f}"
                f"{ratio(tr[arm]['tokens_per_s'], tr['peft']['tokens_per_s']):>10.3f}"
            )
    print(line)
    print("  step and merge ratios: median of per-pair ratios (pairs timed back to back)")
    for arm, t in tr.items():
        print(
            f"  train arm {arm:<16} group_by_length={t['group_by_length']!s:<5} "
            f"{t['steps']} steps: {t['real_tokens']} real tokens of {t['padded_tokens']} fed "
            f"({100 * t['pad_share']:.1f}% padding) in {t['wall_s']:.1f} s -> "
            f"{t['tokens_per_s']:.0f} tok/s, loss {t['loss']:.3f}, {t['precision']}"
            + (f", test accuracy {t['test_accuracy']:.4f}" if "test_accuracy" in t else "")
        )
    print_physical_limit(base, tr, train_ds)
    print(
        f"  parity: eval logits max |diff| before training "
        f"{max(s['logit_diff'] for s in res['step'].values()):.2g}, after safe merge "
        f"{res['merge']['merged_logit_diff']:.2g}"
    )
    foreign = {k: v for k, v in res["foreign_cpu"].items() if v is not None}
    if foreign:
        print(
            "  CPU used by other processes meanwhile: "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in foreign.items())
        )
        if max(foreign.values()) > 0.1:
            print(
                "  WARNING: other processes loaded the machine; timing ratios are noisy, "
                "rerun on a quiet machine"
            )
    print()
    figures = {
        "step_time_ratio_dropout0": res["step"][0.0]["paired_ratio"],
        "step_time_ratio_dropout0.1": res["step"][0.1]["paired_ratio"],
        "peak_memory_ratio": max(peak_ratios.values()),
        "merge_time_ratio": merge_ratios["safe"],
        "merge_time_ratio_unsafe": merge_ratios["unsafe"],
        "train_tokens_per_second_ratio": ratio(
            tr["lora_core"]["tokens_per_s"], tr["peft"]["tokens_per_s"]
        ),
    }
    if "test_accuracy" in tr["lora_core"]:
        figures["test_accuracy_points_vs_peft"] = 100 * (
            tr["lora_core"]["test_accuracy"] - tr["peft"]["test_accuracy"]
        )
    if "lora_core_fp32" in tr:
        figures["train_tokens_per_second_ratio_fp32"] = ratio(
            tr["lora_core_fp32"]["tokens_per_s"], tr["peft"]["tokens_per_s"]
        )
    if "lora_core_plain" in tr:
        figures["train_tokens_per_second_ratio_same_settings"] = ratio(
            tr["lora_core_plain"]["tokens_per_s"], tr["peft"]["tokens_per_s"]
        )
    for key, value in figures.items():
        print(f"{key} = {value:.3f}")
    print(f"(whole benchmark: {total:.0f} s)")
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(
            json.dumps(
                {"figures": figures, "details": res, "seconds": total}, indent=2, default=str
            )
        )
    return figures


if __name__ == "__main__":
    main()
