"""Tracking-server credentials: from the environment or a Prefect Secret block, never from
flow-run parameters, tags, logs or artifacts.

MLflow's client reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or
MLFLOW_TRACKING_TOKEN) from the environment. tracking.credentials_block names a Prefect Secret
block holding "user:password" instead. Prefect stores flow-run parameters in plain text, so
overrides that carry URL credentials are refused by the flow; the CLI moves the credentials of
`tracking.uri=http://user:password@host` into the environment before it starts the flow, and the
config handed to the training deployment has every URL's credentials removed.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tasks.common.config import TrackingConfig, parse_override
from tasks.common.errors import ConfigError

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
HOW = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment, or name a "
    "Prefect Secret block holding 'user:password' in tracking.credentials_block"
)


def redact(value: object) -> str:
    """Text safe to log: credentials in URLs (scheme://user:password@host) become ***."""
    return _USERINFO.sub(r"\g<scheme>***@", str(value))


def has_credentials(value: object) -> bool:
    return isinstance(value, str) and _USERINFO.search(value) is not None


def without_credentials(value: str) -> str:
    """The text with every URL's user:password@ removed."""
    return _USERINFO.sub(r"\g<scheme>", value)


def scrubbed(tree: Any) -> Any:
    """A config tree (dicts, lists, strings) with credentials removed from every URL in it."""
    if isinstance(tree, dict):
        return {k: scrubbed(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [scrubbed(v) for v in tree]
    return without_credentials(tree) if isinstance(tree, str) else tree


def refuse_credentials(overrides: list[str] | None) -> None:
    """Flow parameters are stored in plain text: an override with credentials is an error."""
    for text in overrides or []:
        if has_credentials(text):
            key = text.partition("=")[0]
            raise ConfigError(
                f"override {key}=... carries credentials in a URL; Prefect stores flow-run "
                f"parameters in plain text, so the flow refuses them: {HOW}"
            )


def move_credentials_to_environment(overrides: list[str]) -> list[str]:
    """The CLI's overrides with tracking.uri's user:password moved into the environment."""
    clean = []
    for text in overrides:
        if not has_credentials(text):
            clean.append(text)
            continue
        path, value = parse_override(text)
        if path != ["tracking", "uri"] or not isinstance(value, str):
            raise ConfigError(f"override {'.'.join(path)}=... carries credentials in a URL: {HOW}")
        user, _, password = _USERINFO.search(value).group("userinfo").partition(":")
        os.environ[USER_ENV], os.environ[PASSWORD_ENV] = user, password
        clean.append(f"tracking.uri={without_credentials(value)}")
    return clean


def load_credentials(tracking: TrackingConfig) -> None:
    """Put the Secret block's 'user:password' into the environment MLflow reads."""
    if not tracking.credentials_block:
        return
    from prefect.blocks.system import Secret  # imported here: only a block name needs Prefect

    try:
        secret = Secret.load(tracking.credentials_block).get()
    except ValueError as exc:
        raise ConfigError(
            f"tracking.credentials_block {tracking.credentials_block!r}: no such Prefect Secret "
            f"block ({exc}); create it with Secret(value='user:password').save(name)"
        ) from None
    user, sep, password = str(secret).partition(":")
    if not sep:
        raise ConfigError(
            f"tracking.credentials_block {tracking.credentials_block!r} must hold "
            f"'user:password' (it holds no ':')"
        )
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = user, password
