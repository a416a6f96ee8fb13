"""The egress check of a recorded run: every reply value classified, none only real rows could give."""

from __future__ import annotations

import re

import numpy as np
from flwr.app import Message

from client.egress import egress_problems
from configs.wire import ANY_KEY, DP, egress_entry

# A patient id of the demo cohort, anywhere in any string a hospital sends back.
PATIENT_ID = re.compile(r"P\d{6}")


def _value_problems(message: Message) -> list[str]:
    """Values that could only come from real rows: exact counts in a DP record, a patient's id."""
    problems = []
    entry = egress_entry(message.metadata.message_type) or {}
    for record_name, record in message.content.array_records.items():
        for name, array in record.items():
            values = array.numpy()
            exact = (
                values.size > 0
                and np.issubdtype(values.dtype, np.number)
                and np.all(values == np.round(values))
            )
            if name.endswith("num_batches_tracked"):  # BatchNorm's step counter: sent back as received
                if np.any(values != 0):
                    problems.append(f"{record_name}/{name}: a local step count left the node")
            elif entry.get(record_name, {}).get(ANY_KEY) == DP and not name.endswith(".edges") and exact:
                problems.append(f"{record_name}/{name}: whole numbers in a DP release (exact counts?)")
    for record_name, record in message.content.config_records.items():
        for name, value in record.items():
            if isinstance(value, str) and PATIENT_ID.search(value):
                problems.append(f"config {record_name}/{name} names a patient")
    return problems


def egress_violations(replies: list[Message]) -> list[str]:
    """Every unclassified key (`configs.wire.EGRESS`) or data-shaped value in the replies."""
    problems = []
    for reply in replies:
        if reply.has_error():
            if PATIENT_ID.search(reply.error.reason):
                problems.append(f"refusal names a patient: {reply.error.reason[:80]}")
            continue
        kind = reply.metadata.message_type
        problems += [f"{kind}: {p}" for p in egress_problems(kind, reply.content)]
        problems += [f"{kind}: {p}" for p in _value_problems(reply)]
    return problems
