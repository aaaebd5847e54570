"""Tiny random models with tokenizers built here, offline: a BERT and decoders.

The BERT (2 layers, hidden 32) gets a WordPiece vocabulary of the given texts. The decoders
(Llama, Qwen2, GPT-2) get byte-level BPE tokenizers trained on the texts; Llama and Qwen2 carry
a ChatML-style chat template (special tokens <|im_start|>/<|im_end|>), GPT-2 has none, so the
pipeline's documented default template applies. Used by the tests and the benchmarks; imports
only torch, transformers and tokenizers (the GPU machine runs it without the pipeline's stack).
"""

from __future__ import annotations

import re
from pathlib import Path


def build_tiny_bert(out_dir: Path, texts: list[str]) -> Path:
    """A 2-layer BERT (hidden 32) with random weights and a WordPiece vocab from `texts`."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(specials + words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(out_dir))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(specials) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=256,
        initializer_range=0.2,
    )  # larger than BERT's 0.02: logits that depend on the input
    BertModel(config).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], chat: bool, vocab_size: int = 600):
    """A byte-level BPE trained on `texts`; with chat=True it has ChatML tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|im_end|>" if chat else "</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


SIZES = {  # 2 layers, hidden 32: every family in its own architecture, seconds to train
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512},
}
SIZES["qwen2"] = SIZES["llama"]
CHAT_FAMILIES = ("llama", "qwen2")  # built with the ChatML template; gpt2 without a template


def build_tiny_decoder(
    out_dir: Path,
    texts: list[str],
    family: str = "llama",
    vocab_size: int = 600,
    initializer_range: float = 0.2,  # peaked logits: greedy paths without near-ties
) -> Path:
    """Save a random `family` ('llama', 'qwen2' or 'gpt2') decoder of SIZES and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if family not in SIZES:
        raise ValueError(f"unknown family {family!r}")
    tokenizer = build_tokenizer(texts, chat=family in CHAT_FAMILIES, vocab_size=vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        initializer_range=initializer_range,
        **SIZES[family],
        **ids,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def tiny_config_dict(tmp: Path, model_dir: Path, data_path: Path) -> dict:
    """A config that runs every stage in seconds on the tiny BERT."""
    return {
        "data": {"path": str(data_path), "max_length": 64},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.01, "logging_steps": 2},
        "quantize": {
            "min_top1_agreement": 0.5,
            "max_accuracy_drop": 0.5,
            "calibration_samples": 16,
        },
        "serve": {
            "latency_runs": 5,
            "warmup_runs": 1,
            "throughput_batch_sizes": [8],
            "num_threads": 1,
            "served_model_check": False,  # one test turns it on: it starts a server (~10 s)
            "golden_requests": 16,
        },
        "registry": {"model_name": "tiny-classifier", "bootstrap_samples": 200},
        "tracking": {
            "uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "experiment": "tests",
            "artifact_location": (tmp / "artifacts").as_uri(),
        },
        "output_dir": str(tmp / "outputs"),
    }
