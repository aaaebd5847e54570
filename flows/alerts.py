"""Alert automations: a notification block hears when a retrain fails, when a candidate is not
promoted, and when drift is found without enough labelled data to retrain.

`python -m flows.cli alerts --block custom-webhook/ops-alerts` creates (or replaces) them on
the Prefect server PREFECT_API_URL names; the block is any of Prefect's notification blocks
(`slack-webhook`, `custom-webhook`, `sendgrid-email`, `ms-teams-webhook`, ...), created
beforehand in the UI or with its Python class. Automations need a Prefect server: Prefect's
temporary API evaluates none.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import get_client
from prefect.automations import Automation
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from tasks.common.errors import ConfigError

ALERT_TAG = "lora-alerts"
BODY = (
    "{{ event.event }} on {{ event.resource['prefect.resource.name'] }} at {{ event.occurred }}"
    "\n{{ event.payload | tojson }}"
)


def alert_triggers() -> dict[str, tuple[str, EventTrigger]]:
    """Automation name -> (subject, trigger)."""
    reactive = {"posture": Posture.Reactive, "threshold": 1, "within": timedelta(0)}
    return {
        "lora-retrain-failed": (
            "lora-retrain failed",
            EventTrigger(
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={
                    "prefect.resource.role": "flow",
                    "prefect.resource.name": "lora-retrain",
                },
                **reactive,
            ),
        ),
        "lora-candidate-not-promoted": (
            "a retrained candidate was not promoted",
            EventTrigger(
                expect={"lora.candidate.kept"},
                match={"prefect.resource.id": "lora.model.*"},
                **reactive,
            ),
        ),
        "lora-drift-without-labels": (
            "data drift, not enough labelled rows to retrain",
            EventTrigger(
                expect={"lora.drift.detected"},
                match={"prefect.resource.id": "lora.model.*", "lora.retrain": "false"},
                **reactive,
            ),
        ),
    }


def block_id(spec: str) -> str:
    """The id of the notification block `<block type slug>/<name>`."""
    slug, _, name = spec.partition("/")
    if not slug or not name:
        raise ConfigError(
            f"--block {spec!r}: write it as <block type>/<name>, e.g. slack-webhook/ml-team "
            f"or custom-webhook/ops-alerts"
        )
    with get_client(sync_client=True) as client:
        try:
            return str(client.read_block_document_by_name(name, slug).id)
        except ObjectNotFound:
            raise ConfigError(
                f"notification block {spec!r} not found on the Prefect server: create it first "
                f"(Prefect UI: Blocks, or e.g. SlackWebhook(url=...).save({name!r}))"
            ) from None


def create_alerts(block: str) -> list[str]:
    """Create (or replace) the alert automations, all notifying `block`; their names."""
    if not get_current_settings().api.url:
        raise ConfigError(
            "alerts need a Prefect server (automations do not run on the temporary API): set "
            "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api after `make up`"
        )
    target = block_id(block)
    with get_client(sync_client=True) as client:
        for name in alert_triggers():
            for old in client.read_automations_by_name(name=name):
                client.delete_automation(old.id)  # created again below: one per name
    for name, (subject, trigger) in alert_triggers().items():
        Automation(
            name=name,
            description=f"{subject}: notify {block}",
            tags=[ALERT_TAG],
            trigger=trigger,
            actions=[SendNotification(block_document_id=target, subject=subject, body=BODY)],
        ).create()
    return list(alert_triggers())
