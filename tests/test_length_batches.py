"""How the served classifier batches a request (tasks/classification/onnx_text_classifier.py):
texts of similar length together, answers in the request's order, each text's own numbers."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.classification.data import load_split
from tasks.classification.modeling import session_logits
from tasks.classification.onnx_text_classifier import (
    CALL_COST_TOKENS,
    OnnxTextClassifier,
    length_batches,
    length_grouped,
)
from tasks.common.models import load_tokenizer
from tasks.common.onnx import CPU_SESSION_CONFIG, ONNX_FILE, SERVED_FILE, open_session


def cost(batches, lengths, call_cost=CALL_COST_TOKENS) -> int:
    """Padded tokens computed plus call_cost per batch: what length_batches minimizes."""
    return sum(call_cost + len(b) * max(lengths[i] for i in b) for b in batches)


def best_cost_by_brute_force(lengths, batch_size, call_cost=CALL_COST_TOKENS) -> int:
    """The least cost over every cut of the sorted lengths into runs of <= batch_size."""
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        runs, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                runs.append(ordered[start:i])
                start = i
        runs.append(ordered[start:])
        if max(len(r) for r in runs) > batch_size:
            continue
        total = sum(call_cost + len(r) * max(r) for r in runs)
        best = total if best is None else min(best, total)
    return best


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=10),
    batch_size=st.integers(1, 6),
)
def test_every_text_once_in_batches_of_similar_length_at_least_cost(lengths, batch_size):
    batches = length_batches(lengths, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    # each batch is a run of the texts sorted by length: no batch straddles another
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert cost(batches, lengths) == best_cost_by_brute_force(lengths, batch_size)


def test_a_mixed_request_computes_less_padding_than_one_padded_batch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 60, size=32).tolist()
    batches = length_batches(lengths, 32)
    assert 1 < len(batches) < 8
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 0.75 * 32 * max(lengths)  # one batch padded to the longest: the old way
    # equal lengths need no cut: full batches
    assert sorted(len(b) for b in length_batches([20] * 70, 32)) == [6, 32, 32]
    assert length_batches([], 32) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_each_batch_is_padded_as_the_tokenizer_pads_its_texts(run, side):
    tokenizer = load_tokenizer(run.config.model)
    tokenizer.padding_side = side
    texts = list(load_split(run.stage, run.data, "test")["text"])[:50]
    texts[7] = "late"  # short and long texts in one request
    many = texts * 3  # more than one chunk (64 batches) of batch_size 2: positions offset
    for request, batch_size in ((texts, 8), (many, 2)):
        check_batches(tokenizer, request, batch_size)


def check_batches(tokenizer, texts, batch_size):
    seen = []
    for positions, arrays in length_grouped(tokenizer, texts, 16, batch_size):
        assert len(positions) <= batch_size
        theirs = tokenizer(
            [texts[p] for p in positions],
            padding=True,
            truncation=True,
            max_length=16,
            return_tensors="np",
        )
        assert set(arrays) == set(theirs)
        for key, array in arrays.items():
            np.testing.assert_array_equal(array, theirs[key])
            assert array.dtype == np.int64
        seen += positions
    assert sorted(seen) == list(range(len(texts)))


def test_grouped_logits_are_each_texts_own_in_request_order(run):
    """fp32 ONNX: batching by length changes no number beyond float noise, and the rows come
    back in the order of the texts."""
    tokenizer = load_tokenizer(run.config.model)
    texts = list(load_split(run.stage, run.data, "test")["text"])[:40]
    session = open_session(run.fetch(run.onnx.model) / ONNX_FILE)
    max_length = run.config.data.max_length
    grouped = session_logits(session, tokenizer, texts, max_length, batch_size=16)
    alone = np.concatenate([session_logits(session, tokenizer, [t], max_length) for t in texts])
    np.testing.assert_allclose(grouped, alone, atol=1e-5)
    batches = list(length_grouped(tokenizer, texts, max_length, 16))
    assert len(batches) > 1 and all(len(rows) <= 16 for rows, _ in batches)


def test_the_served_pyfunc_answers_in_order_with_the_checked_session_config(run, tmp_path):
    """The registered folder's serving.json carries the session config the checks ran with,
    the pyfunc applies it, and a mixed request is answered row for row as one at a time."""
    folder = run.fetch(run.quantized.model)
    spec = {
        "label_names": run.label_names,
        "max_length": run.config.data.max_length,
        "batch_size": 8,
        "model_file": SERVED_FILE,
        "session_config": CPU_SESSION_CONFIG,
    }
    (folder / "serving.json").write_text(json.dumps(spec))
    model = OnnxTextClassifier.from_folder(folder)
    options = model.session.get_session_options()
    for key, value in CPU_SESSION_CONFIG.items():
        assert options.get_session_config_entry(key) == value
    texts = list(load_split(run.stage, run.data, "test")["text"])[:30]
    together = model.predict(None, pd.DataFrame({"text": texts}))
    model.batch_size = 1
    one_by_one = model.predict(None, pd.DataFrame({"text": texts}))
    assert list(together["label"]) == list(one_by_one["label"])
    # (the served int8 graph quantizes activations per batch: scores may differ slightly)
    np.testing.assert_allclose(together["score"], one_by_one["score"], atol=0.05)
