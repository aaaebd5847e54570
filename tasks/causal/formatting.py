"""Turning records into training tokens: chat templates, response-only labels, packing.

Every record becomes a conversation (a list of role/content messages ending with an assistant
turn); a prompt/response record is the conversation [user: prompt, assistant: response]. The
conversation is rendered with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE when the
tokenizer has none, and cut into segments by rendering it turn by turn: the text each assistant
turn adds is trained on, everything else (system, user, template markup) gets label -100.
Segments are tokenized one by one, so the prompt tokens are exactly the tokens the model sees at
generation time (rendered with add_generation_prompt=True).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100  # the label that PyTorch's cross-entropy (and transformers) skips

# The documented default for tokenizers without a chat template (e.g. GPT-2 and base models):
#   ### System:\n{content}\n\n### User:\n{content}\n\n### Assistant:\n{content}{eos}\n\n
# It is saved into the merged model's tokenizer, so every consumer formats prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


class FormatError(ValueError):
    """A record that cannot be turned into a training example (the caller adds where)."""


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer DEFAULT_CHAT_TEMPLATE if it has none; True if it did. Also sets a pad
    token (the eos token) where there is none: the collator pads, masks hide the padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


def conversation(record: dict, prompt_column: str, response_column: str, messages_column: str):
    """The record as a list of {role, content} messages (checked), from prompt/response columns
    or from a messages column (a list, or a JSON string of one)."""
    if prompt_column in record and response_column in record:
        prompt, response = record[prompt_column], record[response_column]
        for name, value in ((prompt_column, prompt), (response_column, response)):
            if not isinstance(value, str) or not value.strip():
                raise FormatError(f"column {name!r} is empty or not text ({value!r})")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    messages = record.get(messages_column)
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise FormatError(f"column {messages_column!r} is not valid JSON ({exc})") from exc
    if hasattr(messages, "tolist"):  # numpy arrays from Parquet
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise FormatError(f"column {messages_column!r} must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise FormatError(
                f"message {i} must be a dict with role one of {', '.join(ROLES)}; got {message!r}"
            )
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise FormatError(f"message {i} ({message['role']}) has empty or non-text content")
        checked.append({"role": message["role"], "content": content})
    if checked[-1]["role"] != "assistant":
        raise FormatError("the last message must be the assistant's (the response to learn)")
    return checked


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The text a model continues to answer: the conversation plus the assistant header."""
    return render(tokenizer, messages, add_generation_prompt=True)


def segments(tokenizer, messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; assistant turns are trained."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise FormatError(
                "the chat template renders earlier turns differently once later turns are "
                "added, so prompt and response tokens cannot be told apart; use a template "
                "that renders a conversation as the concatenation of its turns"
            )
        pieces += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    rest = render(tokenizer, messages, add_generation_prompt=False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [(text, trained) for text, trained in pieces if text]


@dataclass(frozen=True)
class Encoded:
    """Token ids and labels (-100 outside trained text) of one conversation."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(tokenizer, messages: Sequence[dict], max_length: int) -> Encoded:
    """Tokenize segment by segment (no special tokens added: the template holds them), label
    the trained ones, cut at max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


def pack(examples: Sequence[Encoded], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Pack whole examples into rows of exactly max_length tokens (first fit, longest first).

    position_ids restart at 0 for each example, and the padding at a row's end is one more
    "example"; transformers turns restarting position ids into a block-diagonal causal mask
    when no attention_mask is given, so no token attends across examples. The first token of
    each example gets label -100 (it must not be predicted from the previous example).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []  # indices of the examples in each row
    room: list[int] = []
    for i in order:
        size = len(examples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([])
            room.append(max_length)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= size
    packed = []
    for members, free in zip(rows, room, strict=True):
        input_ids, labels, position_ids = [], [], []
        for i in sorted(members):
            example = examples[i]
            input_ids += example.input_ids
            labels += [IGNORE_INDEX, *example.labels[1:]]
            position_ids += list(range(len(example.input_ids)))
        input_ids += [pad_id] * free
        labels += [IGNORE_INDEX] * free
        position_ids += list(range(free))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed
