"""lora_core vs PEFT for decoder (causal-LM) LoRA training on a GPU: step time, step memory.

One process, both engines side by side, repetitions interleaved after a warm-up, fixed seeds.
Every ratio is lora_core / peft (step time, memory: lower is better). No hub access: the
decoder is built with random weights from a config shaped like a real small instruct model.

Setup
-----
- Model: `AutoModelForCausalLM.from_config` with random weights (seed 0), fp32 parameters.
  `--shape qwen2-0.5b` (default): Qwen2Config(hidden 896, intermediate 4864, 24 layers, 14
  attention heads, 2 key/value heads, vocab 151936, tied embeddings), LlamaConfig with the same
  sizes if this transformers has no Qwen2. `--shape llama-tiny`: LlamaConfig(hidden 64, 2
  layers, vocab 1000), for a CPU smoke test in seconds.
- LoRA r=16, alpha=32, dropout 0.05 on the attention and MLP projections: lora_core
  `inject_lora(LoraConfig(target_modules="all-linear"))` (which leaves lm_head alone), PEFT
  `get_peft_model` with target_modules=[q,k,v,o,gate,up,down]_proj, task_type CAUSAL_LM. The
  script checks that both wrapped the same layers, then gives PEFT lora_core's LoRA weights
  (with B drawn at random, so the adapter really changes the output).
- Data: batches of random token ids (`--batch-size 8 --seq-len 512`, no padding), labels =
  input ids with the first half of each row (the "prompt") masked with -100.
- One training step: `model.train()`; forward with labels (the model's causal-LM loss) under
  `torch.autocast("cuda", dtype=torch.bfloat16)` with fp32 master weights (what HF Trainer's
  bf16=True does), backward, AdamW step, zero_grad(set_to_none=True). Without CUDA everything
  runs in fp32 on the CPU (smoke test only; no memory figures there).
- Gradient checkpointing on: `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
  {"use_reentrant": False})`. lora_core marks the input embeddings' output as requiring grad
  while the model checkpoints (its `_lora_input_grad_hook`); PEFT does the same through
  `enable_input_require_grads()` only when the model already checkpoints at `get_peft_model`
  time, so the script adds that hook to PEFT's model while checkpointing is on: both engines
  then run the same graph. Gradient checkpointing off: both hooks inactive; this mode is
  measured first, before gradient_checkpointing_enable() ever ran (with transformers 5.17 the
  embedding output still required grad after gradient_checkpointing_disable()).

What is measured
----------------
1. Equivalence: logits of both engines on a small batch (2 x 64 tokens) in eval mode, in fp32
   (must agree to 1e-4 of the largest logit, else the script stops) and under bf16 autocast
   (on CUDA; 2e-2 of the largest logit). The adapter's own effect on the logits (PEFT with
   the adapter disabled vs enabled) is shown for scale.
2. Loss agreement (`loss_max_abs_diff`): after the timing, both engines get their starting
   weights back; from them each trains `--loss-steps` steps (checkpointing on, bf16 on CUDA)
   on the same batches with the RNG reseeded before each run (so the LoRA dropout masks
   match); max |loss difference| over those steps. `loss_noise_floor`: the same for PEFT
   against a rerun of itself from the same weights (GPU kernels, e.g. attention backward,
   need not be bit-reproducible), to judge the engines' difference against.
3. Step time (`step_time_ratio_ckpt_on`, `..._off`): after `--warmup` steps per engine,
   `--steps` repetitions; in each both engines take one step back to back (CUDA-synchronised
   wall time), the order alternating. Figure: median of the per-repetition ratios, with their
   quartiles and the ratio of medians (single steps varied by tens of percent on an H100).
   `tokens_per_second` per engine = batch x seq-len / median step time (all fed tokens).
4. Step memory (`peak_memory_ratio_ckpt_on`, `..._off`, CUDA only): torch.cuda.max_memory_allocated
   during one step (after reset_peak_memory_stats) minus memory_allocated at the step's start,
   i.e. activations, gradients and temporaries above the resident weights + AdamW state; the
   largest over `MEMORY_REPS` steps. `checkpointing_memory_saving` per engine = peak with
   checkpointing off / peak with it on.
5. Sanity per mode: every LoRA parameter gets a nonzero gradient, and whether the embedding
   output required grad (True with checkpointing on for both engines).

Run:  python benchmarks/causal_lora_gpu.py [--shape qwen2-0.5b|llama-tiny] [--batch-size 8]
      [--seq-len 512] [--steps 40] [--warmup 3] [--loss-steps 10] [--json out.json]
Imports only torch, transformers, peft and lora_core (so it runs outside our venv).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from lora_core import LoraConfig, inject_lora, lora_state_dict  # noqa: E402

ENGINES = ("lora_core", "peft")
MODES = ("off", "on")  # gradient checkpointing, in the order measured
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT, LR = 16, 32, 0.05, 2e-4
MEMORY_REPS = 2
FP32_RTOL, BF16_RTOL = 1e-4, 2e-2

SHAPES = {
    "qwen2-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
}


# ---------------------------------------------------------------------------------------------
# models and data


def model_config(shape: str):
    """The shape's config: Qwen2 for qwen2-0.5b (Llama if unavailable), Llama for llama-tiny."""
    sizes = dict(SHAPES[shape], use_cache=False)
    if shape.startswith("qwen2"):
        try:
            from transformers import Qwen2Config

            return Qwen2Config(**sizes)
        except ImportError:
            print("  transformers has no Qwen2: using LlamaConfig with the same sizes")
    return LlamaConfig(**sizes)


def build_base(shape: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(model_config(shape))
    model = model.to(device=device, dtype=torch.float32)
    model.config.use_cache = False
    return model


def build_pair(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    """(lora_core model, peft model, wrapped layer names) on copies of `base`, same LoRA weights."""
    ours = copy.deepcopy(base)
    report = inject_lora(
        ours, LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear")
    )
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide any difference
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=R,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=PROJECTIONS,
        ),
    )
    peft_names = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, PeftLoraLayer)
    )
    if sorted(report.target_names) != peft_names:
        only_ours = sorted(set(report.target_names) - set(peft_names))
        only_peft = sorted(set(peft_names) - set(report.target_names))
        raise SystemExit(
            f"engines wrap different layers: only lora_core {only_ours[:5]}, "
            f"only peft {only_peft[:5]}"
        )
    result = peft.set_peft_model_state_dict(theirs, lora_state_dict(ours))
    if getattr(result, "unexpected_keys", None):
        raise SystemExit(f"peft did not take keys {result.unexpected_keys[:5]}")
    return ours, theirs, report.target_names


def make_batches(
    n: int, batch: int, seq: int, vocab: int, device: torch.device, seed: int
) -> list[dict]:
    """n batches of random token ids; labels mask the first half of each row (the prompt)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        batches.append({"input_ids": ids.to(device), "labels": labels.to(device)})
    return batches


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# training


class Runner:
    """Device helpers: autocast context, synchronisation, the training step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def autocast(self):
        if self.cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self, model, opt, batch) -> torch.Tensor:
        with self.autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_step(self, model, opt, batch) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.step(model, opt, batch)
        self.sync()
        return time.perf_counter() - t0

    def step_peak_bytes(self, model, opt, batch) -> int | None:
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        self.step(model, opt, batch)
        self.sync()
        return torch.cuda.max_memory_allocated() - start


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.copy_(state[n])


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def set_checkpointing(models: dict, on: bool, peft_hooks: list) -> None:
    """Checkpointing on/off for both; PEFT's model gets the input-requires-grad hook while on."""
    for hook in peft_hooks:
        hook.remove()
    peft_hooks.clear()
    for name, model in models.items():
        if on:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            if name == "peft":
                emb = model.get_input_embeddings()
                peft_hooks.append(
                    emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
                )
        else:
            model.gradient_checkpointing_disable()
        if bool(model.is_gradient_checkpointing) != on:
            raise SystemExit(f"{name}: is_gradient_checkpointing is not {on} after switching")


def grad_check(run: Runner, model: torch.nn.Module, batch: dict) -> dict:
    """One forward + backward: LoRA params without a nonzero grad, and whether the embedding
    output required grad (seen by a hook registered after the engines' own)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: seen.append(bool(out.requires_grad))
    )
    try:
        with run.autocast():
            loss = model(**batch).loss
        loss.backward()
    finally:
        hook.remove()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in lora if p.grad is None or not torch.any(p.grad != 0)]
    model.zero_grad(set_to_none=True)
    return {
        "lora_params": len(lora),
        "without_grad": len(missing),
        "example": missing[:1],
        "embedding_output_requires_grad": seen[0] if seen else None,
    }


# ---------------------------------------------------------------------------------------------
# the measurements


@torch.no_grad()
def logits_check(run: Runner, ours, theirs, vocab: int) -> dict:
    batch = make_batches(1, 2, 64, vocab, run.device, seed=123)[0]
    batch = {"input_ids": batch["input_ids"]}
    for m in (ours, theirs):
        m.eval()
    res = {}
    precisions = [("fp32", contextlib.nullcontext, FP32_RTOL)]
    if run.cuda:
        precisions.append(("bf16", run.autocast, BF16_RTOL))
    for label, ctx, rtol in precisions:
        with ctx():
            a = ours(**batch).logits.float()
            b = theirs(**batch).logits.float()
            with theirs.disable_adapter():
                base = theirs(**batch).logits.float()
        scale = a.abs().max().item()
        diff = (a - b).abs().max().item()
        res[label] = {
            "max_abs_diff": diff,
            "max_abs_logit": scale,
            "adapter_effect": (b - base).abs().max().item(),
            "tolerance": rtol * scale,
            "ok": diff <= rtol * scale,
        }
    for m in (ours, theirs):
        m.train()
    return res


def loss_check(run: Runner, models: dict, batches: list[dict], steps: int) -> dict:
    """Each engine trains `steps` steps from the same weights; then PEFT once more from its
    starting weights, which gives the run-to-run noise of one engine (GPU kernels, e.g.
    attention backward, need not be bit-reproducible) to judge the engines' difference against."""

    def train(model: torch.nn.Module) -> list[float]:
        opt = adamw(model)
        torch.manual_seed(1234)  # same dropout masks for every run
        return [run.step(model, opt, batches[i % len(batches)]).item() for i in range(steps)]

    theirs = models["peft"]
    start = trainable_state(theirs)
    losses = {name: train(model) for name, model in models.items()}
    restore(theirs, start)
    losses["peft_repeat"] = train(theirs)

    def max_diff(a: str, b: str) -> float:
        return max((abs(x - y) for x, y in zip(losses[a], losses[b], strict=True)), default=0.0)

    return {
        "losses": losses,
        "max_abs_diff": max_diff("lora_core", "peft"),
        "noise_floor": max_diff("peft", "peft_repeat"),
    }


def measure_mode(run: Runner, models: dict, opts: dict, batches: list[dict], args) -> dict:
    """Warm-up, grad check, interleaved timed steps, then step memory, for the current mode."""
    for i in range(args.warmup):
        for name in ENGINES:
            run.step(models[name], opts[name], batches[i % len(batches)])
    checks = {name: grad_check(run, models[name], batches[0]) for name in ENGINES}
    times = {name: [] for name in ENGINES}
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        for name in ENGINES if i % 2 == 0 else ENGINES[::-1]:
            times[name].append(run.timed_step(models[name], opts[name], batch))
    peaks = {name: [] for name in ENGINES}
    for i in range(MEMORY_REPS):
        for name in ENGINES if i % 2 == 0 else ENGINES[::-1]:
            peaks[name].append(
                run.step_peak_bytes(models[name], opts[name], batches[i % len(batches)])
            )
    median = {name: statistics.median(times[name]) for name in ENGINES}
    ratios = [a / b for a, b in zip(times["lora_core"], times["peft"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    tokens = args.batch_size * args.seq_len
    peak = {name: (max(peaks[name]) if run.cuda else None) for name in ENGINES}
    return {
        "times_s": times,
        "median_s": median,
        "paired_ratio": statistics.median(ratios),
        "paired_ratio_quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_medians": median["lora_core"] / median["peft"],
        "tokens_per_second": {name: tokens / median[name] for name in ENGINES},
        "step_peak_bytes": peak,
        "peak_memory_ratio": peak["lora_core"] / peak["peft"] if run.cuda else None,
        "grad_check": checks,
    }


# ---------------------------------------------------------------------------------------------
# main


def fmt_mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f} MB"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--steps", type=int, default=40, help="timed repetitions per checkpointing mode"
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per engine and mode")
    ap.add_argument("--loss-steps", type=int, default=10, help="steps of the loss agreement check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    run = Runner(device)

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": torch.cuda.get_device_name(device) if run.cuda else platform.processor() or "cpu",
        "precision": "bf16 autocast, fp32 master weights" if run.cuda else "fp32",
    }
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    base = build_base(args.shape, device)
    vocab = base.config.vocab_size
    env["model"] = f"{type(base).__name__} ({args.shape}, random weights)"
    env["attn_implementation"] = getattr(base.config, "_attn_implementation", None)
    env["base_params"] = sum(p.numel() for p in base.parameters())
    ours, theirs, targets = build_pair(base)
    del base
    models = {"lora_core": ours, "peft": theirs}
    env["lora_layers"] = len(targets)
    env["trainable_params"] = {name: n_trainable(m) for name, m in models.items()}
    print(
        f"  {env['model']}, attention {env['attn_implementation']}, {env['base_params']:,} "
        f"parameters; LoRA r={R} alpha={ALPHA} dropout={DROPOUT} on the same {len(targets)} "
        f"layers in both engines, trainable {env['trainable_params']}",
        flush=True,
    )
    if env["trainable_params"]["lora_core"] != env["trainable_params"]["peft"]:
        raise SystemExit("engines train different parameter counts")

    res = {"env": env, "args": vars(args)}
    res["logits"] = logits_check(run, ours, theirs, vocab)
    for label, c in res["logits"].items():
        print(
            f"  logits {label}: max |diff| {c['max_abs_diff']:.3g} "
            f"(tolerance {c['tolerance']:.3g}, largest logit {c['max_abs_logit']:.3g}, "
            f"adapter effect {c['adapter_effect']:.3g})"
            f" -> {'ok' if c['ok'] else 'MISMATCH'}",
            flush=True,
        )
    if not res["logits"]["fp32"]["ok"]:
        raise SystemExit("the engines compute different logits in fp32: timing them means nothing")

    batches = make_batches(4, args.batch_size, args.seq_len, vocab, device, seed=0)
    start = {name: trainable_state(m) for name, m in models.items()}
    # checkpointing off first: some transformers versions leave an input-requires-grad hook
    # behind once gradient_checkpointing_enable() has run, which would change the "off" graph
    opts = {name: adamw(m) for name, m in models.items()}
    peft_hooks: list = []
    res["modes"] = {}
    for mode in MODES:
        set_checkpointing(models, mode == "on", peft_hooks)
        res["modes"][mode] = measure_mode(run, models, opts, batches, args)
        print(f"  checkpointing {mode}: done", flush=True)
    del opts

    for name, model in models.items():  # back to the identical starting weights
        restore(model, start[name])
    res["loss"] = loss_check(run, models, batches, args.loss_steps)
    print(
        f"  loss check ({args.loss_steps} steps, checkpointing on): max |diff| "
        f"{res['loss']['max_abs_diff']:.3g} (PEFT against a rerun of itself: "
        f"{res['loss']['noise_floor']:.3g})",
        flush=True,
    )
    total = time.perf_counter() - t_start

    # ----- the table
    line = "-" * 96
    print()
    print(f"{'measure':<44}{'lora_core':>14}{'peft':>14}{'ratio':>10}  note")
    print(line)
    for mode, m in res["modes"].items():
        med, tps, peak = m["median_s"], m["tokens_per_second"], m["step_peak_bytes"]
        print(
            f"{f'step time, checkpointing {mode}':<44}{1000 * med['lora_core']:>11.1f} ms"
            f"{1000 * med['peft']:>11.1f} ms{m['paired_ratio']:>10.3f}  "
            f"(quartiles {m['paired_ratio_quartiles'][0]:.3f}-"
            f"{m['paired_ratio_quartiles'][1]:.3f}, ratio of medians {m['ratio_of_medians']:.3f})"
        )
        print(
            f"{f'tokens/s, checkpointing {mode}':<44}{tps['lora_core']:>14.0f}{tps['peft']:>14.0f}"
            f"{tps['lora_core'] / tps['peft']:>10.3f}"
        )
        ratio = "" if m["peak_memory_ratio"] is None else f"{m['peak_memory_ratio']:>10.3f}"
        print(
            f"{f'step peak memory, checkpointing {mode}':<44}{fmt_mb(peak['lora_core']):>14}"
            f"{fmt_mb(peak['peft']):>14}{ratio}"
        )
    saving = None
    if run.cuda:
        on, off = res["modes"]["on"]["step_peak_bytes"], res["modes"]["off"]["step_peak_bytes"]
        saving = {name: off[name] / on[name] for name in ENGINES}
        print(
            f"{'checkpointing memory saving (off / on peak)':<44}{saving['lora_core']:>13.2f}x"
            f"{saving['peft']:>13.2f}x"
        )
    print(line)
    for mode, m in res["modes"].items():
        gc = m["grad_check"]
        print(
            f"  checkpointing {mode}: LoRA params without grad "
            + ", ".join(f"{n} {gc[n]['without_grad']}/{gc[n]['lora_params']}" for n in ENGINES)
            + "; embedding output requires grad "
            + ", ".join(f"{n} {gc[n]['embedding_output_requires_grad']}" for n in ENGINES)
        )
    losses = res["loss"]["losses"]
    print(
        "  losses (lora_core | peft): "
        + ", ".join(
            f"{a:.4f}|{b:.4f}" for a, b in zip(losses["lora_core"], losses["peft"], strict=True)
        )
    )
    print()
    figures = {
        "step_time_ratio_ckpt_on": res["modes"]["on"]["paired_ratio"],
        "step_time_ratio_ckpt_off": res["modes"]["off"]["paired_ratio"],
        "peak_memory_ratio_ckpt_on": res["modes"]["on"]["peak_memory_ratio"],
        "peak_memory_ratio_ckpt_off": res["modes"]["off"]["peak_memory_ratio"],
        "tokens_per_second_ckpt_on": res["modes"]["on"]["tokens_per_second"],
        "tokens_per_second_ckpt_off": res["modes"]["off"]["tokens_per_second"],
        "checkpointing_memory_saving": saving,
        "loss_max_abs_diff": res["loss"]["max_abs_diff"],
        "loss_noise_floor": res["loss"]["noise_floor"],
        "logits_max_abs_diff": {k: v["max_abs_diff"] for k, v in res["logits"].items()},
    }
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4g}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key} = {value}")
    print(f"(whole benchmark: {total:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"figures": figures, "details": res, "seconds": total}, indent=2, default=str
            )
        )
    return figures


if __name__ == "__main__":
    main()
