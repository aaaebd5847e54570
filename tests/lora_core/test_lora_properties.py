"""Property tests (hypothesis) on a toy Embedding -> Linear -> Linear/Conv1D -> head model."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_helpers import Toy, randomize_trainable

from lora_core import LoraConfig, count_parameters, inject_lora, merge_lora, unmerge_lora

SETTINGS = settings(max_examples=15, deadline=None)


@st.composite
def setups(draw) -> tuple[dict, LoraConfig, int]:
    dims = {
        "vocab": draw(st.integers(2, 12)),
        "d_in": draw(st.integers(1, 8)),
        "hidden": draw(st.integers(1, 8)),
        "d_out": draw(st.integers(1, 8)),
        "conv1d": draw(st.booleans()),
    }
    limits = {
        "emb": min(dims["vocab"], dims["d_in"]),
        "fc1": min(dims["d_in"], dims["hidden"]),
        "fc2": min(dims["hidden"], dims["d_out"]),
    }
    targets = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=3, unique=True))
    config = LoraConfig(
        r=draw(st.integers(1, min(limits[t] for t in targets))),
        alpha=draw(st.floats(0.5, 32)),
        target_modules=targets,
        use_rslora=draw(st.booleans()),
        init=draw(st.sampled_from(["default", "gaussian"])),
        bias=draw(st.sampled_from(["none", "lora_only", "all"])),
        modules_to_save=draw(st.sampled_from([None, ["head"]])),
    )
    return dims, config, draw(st.integers(0, 2**16))


def build(dims: dict, seed: int) -> tuple[Toy, torch.Tensor]:
    torch.manual_seed(seed)
    model = Toy(dims["vocab"], dims["d_in"], dims["hidden"], dims["d_out"], dims["conv1d"])
    ids = torch.randint(0, dims["vocab"], (3, 5))
    return model, ids


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@SETTINGS
@given(setups())
def test_init_equals_base(setup) -> None:
    dims, config, seed = setup
    model, ids = build(dims, seed)
    expected = model(ids)
    inject_lora(model, config)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


@SETTINGS
@given(setups())
def test_merge_unmerge(setup) -> None:
    dims, config, seed = setup
    model, ids = build(dims, seed)
    inject_lora(model, config)
    randomize_trainable(model, seed=seed, std=0.3)
    before = frozen_state(model)
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
    for name, weight in frozen_state(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-6)


@SETTINGS
@given(setups())
def test_trainable_count_closed_form(setup) -> None:
    dims, config, seed = setup
    model, _ = build(dims, seed)
    params = dict(model.named_parameters())
    shapes = {
        "emb": (dims["vocab"], dims["d_in"]),
        "fc1": (dims["d_in"], dims["hidden"]),
        "fc2": (dims["hidden"], dims["d_out"]),
    }
    extra = set()
    if config.modules_to_save:
        extra |= {"head.weight", "head.bias"}
    if config.bias == "all":
        extra |= {"fc1.bias", "fc2.bias", "head.bias"}
    if config.bias == "lora_only":
        extra |= {f"{t}.bias" for t in config.target_modules if t != "emb"}
    total_before = sum(p.numel() for p in params.values())
    lora = sum(config.r * (shapes[t][0] + shapes[t][1]) for t in config.target_modules)

    report = inject_lora(model, config)
    assert report.trainable_params == lora + sum(params[n].numel() for n in extra)
    assert report.total_params == total_before + lora
    assert count_parameters(model) == (report.trainable_params, report.total_params)


@SETTINGS
@given(setups())
def test_optimizer_step_leaves_base_unchanged(setup) -> None:
    dims, config, seed = setup
    model, ids = build(dims, seed)
    inject_lora(model, config)
    randomize_trainable(model, seed=seed, std=0.3)
    before = frozen_state(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params, on purpose
    model(ids).square().mean().backward()
    opt.step()
    for name, weight in frozen_state(model).items():
        assert torch.equal(weight, before[name]), name
    changed = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, trainable[n])
    ]
    assert changed


def test_deepcopy_keeps_working() -> None:
    model, ids = build({"vocab": 5, "d_in": 4, "hidden": 4, "d_out": 4, "conv1d": True}, 0)
    inject_lora(model, LoraConfig(r=2, target_modules=["fc1", "fc2", "emb"]))
    randomize_trainable(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids), model(ids))
