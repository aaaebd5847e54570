"""LoraConfig validation: every bad value raises LoraError with an exact, helpful message."""

import re

import pytest

from lora_core import LoraConfig, LoraError


def test_defaults() -> None:
    cfg = LoraConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout) == (8, 16, 0.0)
    assert cfg.target_modules == ["query", "value"]
    assert cfg.scaling == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0
    assert issubclass(LoraError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"r": 0},
            "lora.r must be a positive integer, got 0: set r to 1 or more (8 and 16 are common)",
        ),
        (
            {"r": -3},
            "lora.r must be a positive integer, got -3: set r to 1 or more (8 and 16 are common)",
        ),
        (
            {"r": 2.5},
            "lora.r must be a positive integer, got 2.5: set r to 1 or more (8 and 16 are common)",
        ),
        (
            {"alpha": 0},
            "lora.alpha must be a positive number, got 0: set alpha to e.g. 16 (often 2 * r)",
        ),
        (
            {"alpha": -1.0},
            "lora.alpha must be a positive number, got -1.0: set alpha to e.g. 16 (often 2 * r)",
        ),
        (
            {"dropout": 1.0},
            "lora.dropout must be a number in [0, 1), got 1.0: use 0.0 (off) or e.g. 0.05",
        ),
        (
            {"bias": "some"},
            "lora.bias must be one of ['none', 'lora_only', 'all'], got 'some': use 'none' unless "
            "unsure",
        ),
        (
            {"init": "pissa"},
            "lora.init must be one of ['default', 'gaussian'], got 'pissa': use 'default' unless "
            "unsure",
        ),
        (
            {"target_modules": []},
            "lora.target_modules must be a non-empty list of layer names or a regex string, got "
            "[]: "
            "e.g. ['query', 'value'] or 'all-linear'",
        ),
        (
            {"modules_to_save": "classifier"},
            "lora.modules_to_save must be a list of module names, got 'classifier': e.g. "
            "['classifier']",
        ),
        ({"use_rslora": "yes"}, "lora.use_rslora must be true or false, got 'yes'"),
    ],
)
def test_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(LoraError, match=f"^{re.escape(message)}$"):
        LoraConfig(**kwargs)


def test_bad_regex() -> None:
    with pytest.raises(LoraError, match=r"^lora.target_modules '\(query' is not a valid regex"):
        LoraConfig(target_modules="(query")
