"""Decoder serving on this CPU: ONNX (KV cache) fp32 and int8 vs PyTorch eager, in one run.

There is no real decoder to download here, so the model is a random-weight Qwen2-architecture
decoder of a chosen width and depth (default: hidden 512, 6 layers, 8 heads / 2 KV heads, MLP
1408) with a byte-level BPE tokenizer trained on the demo texts (testkit/tiny.py). The
pipeline's own stages run on it with the demo routing chats: LoRA training for --steps steps,
merge, export with KV cache, the quantize stage with its default gates (each dynamic int8
variant scored against fp32: agreement of greedy answers, perplexity, decode ms per token; the
fastest passing one ships), and serve_check (time to first token
and decode tokens/s, served ONNX vs merged PyTorch, one engine at a time, same thread count).
Speed figures hold for any weights of this shape; agreement and perplexity figures of a briefly
trained random model say little about a real one.

    .venv/bin/python benchmarks/causal_serving.py [--hidden 512] [--layers 6] [--steps 30]
        [--runs 40] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from flows.retrain import run_stages
from tasks.common.config import apply_overrides, config_from_dict
from tasks.common.tracking import Tracking, start_pipeline_run
from testkit.tiny import SIZES, build_tiny_decoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary (at most)")
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--runs", type=int, default=40, help="timed requests per engine")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    store = Path(tempfile.mkdtemp(prefix="bench-causal-"))
    texts = list(pd.read_csv(ROOT / "data" / "demo" / "support_tickets.csv")["text"])
    SIZES["qwen2"] = SIZES["qwen2"] | {
        "hidden_size": args.hidden,
        "intermediate_size": int(args.hidden * 2.75),
        "num_hidden_layers": args.layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    }
    model_dir = build_tiny_decoder(
        store / "model", texts, "qwen2", vocab_size=args.vocab, initializer_range=0.02
    )
    tree = {
        "task": "causal_lm",
        "data": {"path": str(ROOT / "data" / "demo" / "support_routing.jsonl"), "max_length": 256},
        "model": {"name_or_path": str(model_dir)},
        "train": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 0.002},
        "eval": {"max_new_tokens": 8, "generation_prompts": 16},
        "export": {"parity_prompts": 8},
        "serve": {"latency_runs": args.runs, "warmup_runs": 3, "served_model_check": False},
        "tracking": {
            "uri": f"sqlite:///{store / 'mlflow.db'}",
            "artifact_location": (store / "art").as_uri(),
        },
        "output_dir": str(store / "out"),
    }
    config = config_from_dict(apply_overrides(tree, args.overrides))

    run_id = start_pipeline_run(config)
    out = run_stages(config, run_id, until="serve_check")
    quantized, served = out.quantized, out.served
    metrics = Tracking.connect(config.tracking).client.get_run(run_id).data.metrics
    fp32_ms = metrics["quantize/fp32.ms_per_token"]
    print(
        f"\nmodel: Qwen2 architecture, random weights + {args.steps} LoRA steps, hidden "
        f"{args.hidden}, {args.layers} layers; agreement: greedy answers (<= "
        f"{config.export.parity_new_tokens} tokens) to {config.export.parity_prompts} prompts; "
        f"gates: agreement >= {config.quantize.min_token_agreement}, perplexity <= "
        f"+{config.quantize.max_perplexity_increase:.0%}; threads "
        f"{config.serve.num_threads or 'all'}"
    )
    print(f"{'variant':<22}{'ms/token':>10}{'vs fp32':>9}{'agreement':>11}{'ppl':>10}{'MB':>8}")
    print(
        f"{'fp32 (onnx)':<22}{fp32_ms:>10.2f}{1.0:>9.3f}{1.0:>11.3f}"
        f"{quantized.fp32_score:>10.2f}{metrics['quantize/fp32.size_mb']:>8.1f}"
    )
    for c in quantized.candidates:
        print(
            f"{c.name:<22}{c.p50_ms:>10.2f}{c.p50_ms / fp32_ms:>9.3f}"
            f"{c.scores['token_agreement']:>11.3f}{c.scores['perplexity']:>10.2f}"
            f"{c.size_mb:>8.1f}"
        )
    t = served.timings
    print(f"\nserved variant: {quantized.variant} ({quantized.reason})")
    print(
        f"time to first token p50: onnx {t['serve/onnx.ttft_p50_ms']:.2f} ms, "
        f"torch {t['serve/torch.ttft_p50_ms']:.2f} ms -> ratio "
        f"{t['serve/onnx.ttft_p50_ms'] / t['serve/torch.ttft_p50_ms']:.3f}"
    )
    print(
        f"decode tokens/s: onnx {t['serve/onnx.tokens_per_second']:.1f}, torch "
        f"{t['serve/torch.tokens_per_second']:.1f} -> ratio "
        f"{t['serve/speedup.tokens_per_second']:.2f}x"
    )


if __name__ == "__main__":
    main()
