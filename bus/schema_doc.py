"""A machine-readable AsyncAPI 3.0 document of commands and events, generated from the models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bus import subjects
from bus.errors import ErrorReply
from bus.service import BusService, schema_name

ASYNCAPI_VERSION = "3.0.0"


def _component_name(model: type[BaseModel]) -> str:
    return schema_name(model).replace("skyferry.v1.", "").replace(".", "_")


def build_document(
    services: Iterable[BusService], events: dict[str, type[BaseModel]], *, title: str = "Skyferry"
) -> dict[str, Any]:
    """AsyncAPI document: one channel per command and per event aggregate, JSON Schemas in components."""
    services = list(services)
    models: dict[str, type[BaseModel]] = {"error": ErrorReply}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for svc in services:
        for verb, spec in svc.commands.items():
            req, resp = _component_name(spec.request), _component_name(spec.response)
            models[req], models[resp] = spec.request, spec.response
            ch = f"{svc.name}_{verb}"
            channels[ch] = {
                "address": f"{svc.prefix}.{verb}",
                "description": spec.description,
                "messages": {
                    "request": {"$ref": f"#/components/messages/{req}"},
                    "reply": {"$ref": f"#/components/messages/{resp}"},
                    "error": {"$ref": "#/components/messages/error"},
                },
            }
            operations[ch] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{ch}"},
                "summary": spec.description,
                "x-auth": "none" if spec.public else "signed (Sf-Signature, ed25519 nkey of Sf-Actor)",
                "reply": {"channel": {"$ref": f"#/channels/{ch}"}},
            }
    for ev_type, model in sorted(events.items()):
        name = _component_name(model)
        models[name] = model
        agg = ev_type.split(".")[-2]
        ch = f"event_{name}"
        channels[ch] = {
            "address": "sf.evt.{aggregate}.{id}",
            "description": f"Event {ev_type} (Sf-Schema header) on the aggregate's subject in stream "
            f"{subjects.EVENTS_STREAM}; record kind {agg}.",
            "parameters": {"aggregate": {}, "id": {}},
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        operations[ch] = {"action": "send", "channel": {"$ref": f"#/channels/{ch}"}}
    _, defs = models_json_schema(
        [(m, "serialization") for m in models.values()], ref_template="#/components/schemas/{model}"
    )
    schemas = defs.get("$defs", {})
    messages = {
        name: {
            "name": name,
            "title": schema_name(model),
            "contentType": "application/msgpack",
            "x-alternate-content-types": ["application/json"],
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }
        for name, model in models.items()
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": "1",
            "description": "Commands are NATS request/reply; events are JetStream messages. Envelope fields travel "
            "in headers (Sf-Msg-Id, Sf-Correlation-Id, Sf-Causation-Id, Sf-Actor, Sf-Timestamp, Sf-Schema, "
            "Sf-Signature, Content-Type).",
        },
        "defaultContentType": "application/msgpack",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
