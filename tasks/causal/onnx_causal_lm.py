"""MLflow pyfunc model, logged from code: a chat LLM (ONNX decoder with KV cache) answered greedily.

This file is copied into every registered model, so it imports nothing from this project.
Input: a table with a `messages` column (a list of {"role", "content"} dicts ending with a user
turn, or that list as a JSON string) or a `prompt` column (user text: one user turn); a string or
a list of strings are prompts too. Params: `max_new_tokens` (default from serving.json).
Output: `text` (the answer), `new_tokens` (how many were generated) and `finish_reason`
("eos" or "length") per row.
"""

import json
from pathlib import Path

import mlflow
import onnxruntime as ort
import pandas as pd
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer, GenerationConfig

SERVING_FILE = "serving.json"  # written by the register stage: model file, max_new_tokens, device
COLUMNS = ["text", "new_tokens", "finish_reason"]


def _conversation(messages) -> list[dict]:
    if isinstance(messages, str):
        messages = json.loads(messages)
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def _conversations(model_input) -> list[list[dict]]:
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, pd.DataFrame):
        return [[{"role": "user", "content": str(p)}] for p in model_input]
    if "messages" in model_input.columns:
        return [_conversation(m) for m in model_input["messages"]]
    if "prompt" in model_input.columns:
        return [[{"role": "user", "content": str(p)}] for p in model_input["prompt"]]
    raise ValueError(
        f"input needs a `messages` or a `prompt` column, got {list(model_input.columns)}"
    )


class OnnxCausalLM(mlflow.pyfunc.PythonModel):
    """Chat template, greedy decoding at batch size 1 with onnxruntime, answer text."""

    def load_context(self, context):
        self._load(Path(context.artifacts["model_dir"]))

    @classmethod
    def from_folder(cls, model_dir) -> "OnnxCausalLM":
        """The model on a local folder, as the pipeline uses it in-process."""
        model = cls()
        model._load(Path(model_dir))
        return model

    def _load(self, model_dir: Path):
        spec = json.loads((model_dir / SERVING_FILE).read_text())
        self.max_new_tokens = int(spec.get("max_new_tokens", 64))
        provider = (
            "CUDAExecutionProvider" if spec.get("device") == "cuda" else "CPUExecutionProvider"
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        options = ort.SessionOptions()
        for key, value in spec.get("session_config", {}).items():
            options.add_session_config_entry(key, value)  # what the checks ran with
        self.model = ORTModelForCausalLM.from_pretrained(
            str(model_dir), file_name=spec["model_file"], provider=provider, session_options=options
        )
        configured = self.model.generation_config.eos_token_id
        eos = [configured] if isinstance(configured, int) else list(configured or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def answer(self, conversations: list[list[dict]], max_new_tokens: int | None = None):
        """Greedy answers to conversations (each ending with a user turn), one at a time."""
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        answers = []
        with torch.inference_mode():
            for conversation in conversations:
                prompt = self.tokenizer.apply_chat_template(
                    conversation, add_generation_prompt=True, tokenize=False
                )
                batch = self.tokenizer(
                    prompt,
                    add_special_tokens=False,
                    return_token_type_ids=False,
                    return_tensors="pt",
                ).to(self.model.device)
                out = self.model.generate(
                    **batch, generation_config=config, use_model_defaults=False
                )
                new = out[0, batch["input_ids"].shape[1] :].tolist()
                answers.append(
                    {
                        "text": self.tokenizer.decode(new, skip_special_tokens=True),
                        "new_tokens": len(new),
                        "finish_reason": "eos" if new and new[-1] in self.eos_ids else "length",
                    }
                )
        return answers

    def predict(self, context, model_input: pd.DataFrame, params=None):
        max_new_tokens = (params or {}).get("max_new_tokens")
        answers = self.answer(
            _conversations(model_input), None if max_new_tokens is None else int(max_new_tokens)
        )
        return pd.DataFrame(answers, columns=COLUMNS)


mlflow.models.set_model(OnnxCausalLM())
