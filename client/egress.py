"""The egress guard: a reply leaves the node only if every record and key in it is classified in the
wire protocol's `EGRESS` table (a DP release, a declared public fact or post-processing of DP
outputs); a reply with anything else is withheld and the node sends a refusal instead."""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from configs.wire import ANY_KEY, egress_entry

logger = logging.getLogger(__name__)


def egress_problems(message_type: str, content: RecordDict) -> list[str]:
    """Every record or key of a reply to `message_type` that `EGRESS` does not classify."""
    entry = egress_entry(message_type)
    if entry is None:
        return [f"no egress classification for '{message_type}' replies"]
    problems = []
    for record_name, record in content.items():
        allowed = entry.get(record_name)
        if allowed is None:
            problems.append(f"record '{record_name}'")
        elif ANY_KEY not in allowed:
            problems.extend(f"'{record_name}.{key}'" for key in record if key not in allowed)
    return problems


def egress_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: withhold any reply carrying an unclassified value (logged here, not sent)."""
    reply = call_next(message, context)
    if reply.has_error():
        return reply  # a refusal's reason is built by `client.refusals.public_reason`
    problems = egress_problems(message.metadata.message_type, reply.content)
    if not problems:
        return reply
    logger.error("egress guard withheld a %s reply: unclassified %s", message.metadata.message_type, problems)
    reason = f"egress guard: the reply held unclassified values ({', '.join(problems[:5])}); not sent"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
