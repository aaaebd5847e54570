"""Put LoRA into a model and take it out again: inject, merge, unmerge, unload, count.

Everything works in place on an ordinary nn.Module (HF or not). Injection walks
`model.named_modules()`, swaps each targeted layer for its wrapper via setattr on the parent,
freezes everything else, and stores the config on the model (`model._lora_config`) so that
saving needs nothing but the model.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import ALL_LINEAR, LoraConfig, LoraError
from .layers import LoraLayer, in_out_features, is_conv1d, is_supported, looks_like_lora, wrap

CONFIG_ATTR = "_lora_config"
HOOK_ATTR = "_lora_input_grad_hook"
HEAD_NAMES = ("classifier", "score", "lm_head")  # output heads that "all-linear" leaves alone
MAX_LISTED = 20


@dataclass
class InjectionReport:
    """What inject_lora did: which layers got LoRA, and the parameter counts afterwards."""

    target_names: list[str]
    trainable_params: int
    total_params: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"LoRA on {len(self.target_names)} layers: {self.trainable_params:,} trainable of "
            f"{self.total_params:,} parameters ({100 * self.trainable_fraction:.3f}%)"
        )


# ---------------------------------------------------------------------------------------------
# name matching (PEFT's rules)


def name_matches(name: str, spec: list[str] | str) -> bool:
    """A list entry matches the full dotted name or a '.'-suffix; a str is a fullmatch regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _within(name: str, spec: list[str]) -> bool:
    """True when `name` is a module matched by `spec` or lies inside one."""
    parts = name.split(".")
    return any(name_matches(".".join(parts[:i]), spec) for i in range(1, len(parts) + 1))


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, wrapper) for every lora_core layer in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def get_lora_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not lora_layers(model):
        raise LoraError(
            f"{type(model).__name__} holds no lora_core LoRA layers: call inject_lora(model, "
            "config) "
            "or load_adapter(model, adapter_dir) first"
        )
    return config


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output embedding (lm_head and the like), when it can tell us."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        head = None
    if head is None:
        return set()
    return {n for n, m in model.named_modules() if m is head}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the layers `config` puts LoRA on, validated (raises LoraError with a fix)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    mts = config.modules_to_save or []
    exclude = config.exclude_modules
    skip_heads = _output_head_names(model) if config.target_modules == ALL_LINEAR else set()

    targets = []
    for name, module in modules:
        if (mts and _within(name, mts)) or (exclude is not None and name_matches(name, exclude)):
            continue
        if config.target_modules == ALL_LINEAR:
            is_head = name in skip_heads or any(part in HEAD_NAMES for part in name.split("."))
            if (isinstance(module, nn.Linear) or is_conv1d(module)) and not is_head:
                targets.append(name)
        elif name_matches(name, config.target_modules):
            if is_supported(module):
                targets.append(name)
            elif isinstance(
                config.target_modules, list
            ):  # an explicit name for something we cannot wrap
                inner = [n for n, m in module.named_modules(prefix=name) if is_supported(m)]
                hint = f" such as {_listing(inner)}" if inner else ""
                raise LoraError(
                    f"lora.target_modules matched {name}, a {type(module).__name__}, which cannot "
                    "take LoRA "
                    "(supported: nn.Linear, nn.Embedding, transformers Conv1D). Name its "
                    f"layers{hint} instead."
                )

    if not targets:
        candidates = [n for n, m in modules if is_supported(m)]
        raise LoraError(
            f"lora.target_modules {config.target_modules!r} matched no layer of "
            f"{type(model).__name__}"
            + (f" (after exclude_modules {exclude!r})" if exclude is not None else "")
            + f". Layers that can take LoRA: {_listing(candidates) or 'none'}. "
            "Fix target_modules to name some of them."
        )
    for name in targets:
        layer = model.get_submodule(name)
        fan_in, fan_out = in_out_features(layer)
        if config.r > min(fan_in, fan_out):
            raise LoraError(
                f"lora.r={config.r} is too large for {name}, a {type(layer).__name__} with weight "
                "shape "
                f"{tuple(layer.weight.shape)}: r must be at most {min(fan_in, fan_out)} there. "
                "Lower r or leave that layer out via exclude_modules."
            )
    return targets


def _resolve_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = []
    for entry in names:
        hits = [n for n, _ in model.named_modules() if n and name_matches(n, [entry])]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise LoraError(
                f"lora.modules_to_save entry {entry!r} matched no module of {type(model).__name__} "
                f"(its top-level modules: {_listing(top)}). Fix or drop the entry."
            )
        found += hits
    return found


# ---------------------------------------------------------------------------------------------
# gradient checkpointing support


class _InputsRequireGrad:
    """Forward hook on the input embeddings: with (reentrant) gradient checkpointing, a
    checkpointed block whose inputs do not require grad gives its LoRA weights no gradient.
    Marking the embedding output as requiring grad fixes that (PEFT does the same), and we only
    do it while the model trains with checkpointing on, so plain training pays nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        if (
            module.training
            and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor)
            and output.is_floating_point()
            and not output.requires_grad
            and getattr(self.model, "is_gradient_checkpointing", False)
        ):
            output.requires_grad_(True)


def _add_input_grad_hook(model: nn.Module) -> None:
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if isinstance(emb, nn.Module):
        setattr(model, HOOK_ATTR, emb.register_forward_hook(_InputsRequireGrad(model)))


# ---------------------------------------------------------------------------------------------
# public API


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def inject_lora(model: nn.Module, config: LoraConfig) -> InjectionReport:
    """Wrap every targeted layer with LoRA, in place, and freeze all but the trainable parts.

    Trainable afterwards: the LoRA A/B weights, every parameter of `config.modules_to_save`, and
    biases per `config.bias`. Raises LoraError (model untouched) when the config does not fit.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"inject_lora needs a lora_core.LoraConfig, got {type(config).__name__}")
    existing = [n for n, m in model.named_modules() if looks_like_lora(m)]
    if existing:
        raise LoraError(
            f"{type(model).__name__} already holds LoRA layers (e.g. {existing[0]}): call "
            "unload_lora(model) first, or inject into a fresh base model"
        )
    targets = resolve_targets(model, config)
    save_names = _resolve_modules_to_save(model, config.modules_to_save or [])

    for p in model.parameters():
        p.requires_grad_(False)
    hyper = {k: getattr(config, k) for k in ("r", "alpha", "dropout", "use_rslora", "init")}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrap(getattr(parent, child), **hyper))
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(model):
            if isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter):
                layer.base_layer.bias.requires_grad_(True)
    for name in save_names:
        model.get_submodule(name).requires_grad_(True)
    _warn_if_shared(model, save_names)

    setattr(model, CONFIG_ATTR, copy.deepcopy(config))
    _add_input_grad_hook(model)
    return InjectionReport(targets, *count_parameters(model))


def merge_lora(model: nn.Module, safe: bool = True) -> None:
    """Fold every LoRA update into its base weight, in place (wrappers stay, flagged merged).

    With safe=True every merged weight is computed in a copy and checked for inf/NaN first, so a
    broken adapter raises LoraError naming the layer and leaves all base weights untouched.
    """
    layers = [(n, m) for n, m in lora_layers(model) if not m.merged]
    if not layers:
        warnings.warn("merge_lora: no unmerged LoRA layers, nothing to do", stacklevel=2)
        return
    for name, layer in layers:
        dtype = layer.base_layer.weight.dtype
        if not dtype.is_floating_point:
            raise LoraError(
                f"cannot merge LoRA into {name}: its weight is {dtype}, not floating point"
            )
    if safe:
        for name, layer in layers:
            with torch.no_grad():
                if not torch.isfinite(layer.merged_weight()).all():
                    raise LoraError(
                        f"merging LoRA into {name} gives inf/NaN weights: the adapter is broken "
                        "(diverged training?). No base weight was changed."
                    )
    _warn_if_tied(model, [m for _, m in layers])
    for _, layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged LoRA update from its base weight again."""
    layers = [m for _, m in lora_layers(model) if m.merged]
    if not layers:
        warnings.warn("unmerge_lora: no merged LoRA layers, nothing to do", stacklevel=2)
    for layer in layers:
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by its base layer and return the plain model.

    merge=True folds the updates in first (safe merge); merge=False restores the base weights.
    Parameters keep their requires_grad flags (the base stays frozen).
    """
    layers = lora_layers(model)
    if merge and any(not m.merged for _, m in layers):
        merge_lora(model, safe=True)
    for name, layer in layers:
        if not merge:
            layer.unmerge()
        if not name:
            model = layer.base_layer
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    hook = getattr(model, HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, HOOK_ATTR)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def _warn_if_tied(model: nn.Module, layers: list[LoraLayer]) -> None:
    """Merging into a weight shared with another module (tied embeddings) changes it too."""
    wrapped = {id(m.base_layer.weight) for m in layers}
    bases = {id(m.base_layer) for m in layers}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, LoraLayer)
            or id(module) in bases
            or not isinstance(weight, torch.Tensor)
        ):
            continue
        if id(weight) in wrapped:
            warnings.warn(
                f"merge_lora: the merged weight is tied to {name}, which changes too", stacklevel=3
            )


def _warn_if_shared(model: nn.Module, save_names: list[str]) -> None:
    """A modules_to_save weight tied to another module (e.g. lm_head and the input embedding)
    trains both; PEFT instead trains a copy. Say so rather than silently differ."""
    owned = {id(p) for n in save_names for p in model.get_submodule(n).parameters()}
    inside = tuple(f"{n}." for n in save_names)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owned and not name.startswith(inside):
            warnings.warn(
                f"lora.modules_to_save: {name} is tied to a weight in {save_names}, so training "
                "that module changes it too (PEFT would train an untied copy)",
                stacklevel=3,
            )
