"""search.space as Optuna suggestions, and a trial's values as a config.

A choice list is a categorical over its values; a mapping is a categorical over its names
(Optuna keeps only scalars, so lists of layer names travel by name); a range is an int or float
distribution. A `times` key draws a factor (its Optuna parameter is named `<key>/<base>`) and
takes factor x the base key's value, so lora.alpha follows lora.r.
"""

from __future__ import annotations

from typing import Any

import optuna

from tasks.common.config import PipelineConfig, SearchParam, config_from_dict, with_value


def optuna_name(key: str, param: SearchParam) -> str:
    """The Optuna parameter behind a searched key (a factor for `times` keys)."""
    return f"{key}/{param.times}" if param.times else key


def draw(trial: optuna.Trial, name: str, param: SearchParam) -> Any:
    """One suggestion: a choice (its name, for a mapping), or a number in the range."""
    if param.choices is not None:
        options = list(param.choices) if isinstance(param.choices, dict) else param.choices
        return trial.suggest_categorical(name, options)
    if param.integer:
        return trial.suggest_int(name, param.low, param.high, step=param.step or 1, log=param.log)
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)


def config_value(param: SearchParam, drawn: Any, base: Any = None) -> Any:
    """What a drawn suggestion sets in the config."""
    if isinstance(param.choices, dict):
        drawn = param.choices[drawn]
    return drawn * base if param.times else drawn


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> dict[str, Any]:
    """The trial's config values, dotted key -> value (bases before the keys that follow them)."""
    ordered = sorted(space, key=lambda key: space[key].times is not None)
    values: dict[str, Any] = {}
    for key in ordered:
        param = space[key]
        drawn = draw(trial, optuna_name(key, param), param)
        values[key] = config_value(param, drawn, values.get(param.times))
    return values


def values_of(params: dict[str, Any], space: dict[str, SearchParam]) -> dict[str, Any]:
    """A finished trial's config values, from its Optuna params."""
    values: dict[str, Any] = {}
    for key in sorted(space, key=lambda key: space[key].times is not None):
        param = space[key]
        values[key] = config_value(param, params[optuna_name(key, param)], values.get(param.times))
    return values


def with_values(config: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """The config with a trial's values set (validated again: the space was checked up front)."""
    tree = config.model_dump(mode="json")
    for key, value in values.items():
        tree = with_value(tree, key, value)
    return config_from_dict(tree, source="a search trial")


def label(value: Any) -> str:
    """A value as a short text for tags and tables (layer lists joined by commas)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
