"""What a refusing node tells the coordinator, and the fuller detail it keeps in its own log.

A refusal reason travels to the server and ends up in its metrics.json, so it must carry no
patient ids and no cell values: for invalid data, only where (file, line, column) and what kind
of problem (a fixed vocabulary). The human detail, which may quote ids and values (cut short),
stays in the hospital's log and in `mindfed check`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from client.data import MAX_PROBLEM_CHARS, CohortValidationError, ValidationIssue, clip
from configs.wire import WireError
from models.encoder import EncoderError
from models.releases.base import ReleaseError
from privacy.ledger import BudgetExceededError

# Enough for the coordinator to see what to ask the hospital about; the rest is a count.
MAX_PUBLIC_ISSUES = 5
# Bound on a forwarded message of our own, however it was built.
MAX_REASON_CHARS = 300
# Bound on the local log line (each validation issue is already bounded; this caps the rest).
MAX_LOCAL_CHARS = 4000

# Refusals whose messages our own code writes from the server's request, the schema and the
# node's settings, never from patient rows: forwarded as they are, once bounded.
_OWN_MESSAGES: tuple[type[Exception], ...] = (BudgetExceededError, EncoderError, WireError, ReleaseError)
# Classes whose column name was read from the file's header (which may be a data row), not
# taken from the schema: the name stays local.
_COLUMN_FROM_FILE = frozenset({"unexpected column", "not comma-separated", "NUL character"})
# The folder's own path names the hospital's storage layout: it stays local.
_NO_FILE_NAME = frozenset({"folder not found"})


def public_reason(err: Exception, hospital: str) -> str:
    """The refusal reason sent to the coordinator: never ids, cell values or local paths."""
    if isinstance(err, CohortValidationError):
        body = _public_cohort_summary(err)
    elif isinstance(err, _OWN_MESSAGES):
        body = clip(str(err), MAX_REASON_CHARS)
    else:
        # Unknown errors may quote anything they touched: send only what kind they were.
        body = type(err).__name__
    return f"{hospital}: {body}"


def local_detail(err: Exception) -> str:
    """The fuller refusal detail for the hospital's own log, bounded in length."""
    return clip(f"{type(err).__name__}: {err}", MAX_LOCAL_CHARS)


def log_refusal_detail(logger: logging.Logger, hospital: str, err: Exception, *, request: str = "") -> None:
    """Log the refusal's local detail (ids and values cut short) on the hospital's side only."""
    logger.warning("%s refusing %s: %s", hospital, request or "a request", local_detail(err))


def public_issue(issue: ValidationIssue) -> str:
    """One validation issue as the coordinator may see it: file, line, column and class."""
    where = _public_file(issue)
    if issue.row is not None:
        where += f", line {issue.row}"
    if issue.column is not None and issue.problem_class not in _COLUMN_FROM_FILE:
        where += f", column '{clip(issue.column, MAX_PROBLEM_CHARS)}'"
    return f"{where}: {issue.problem_class}"


def _public_file(issue: ValidationIssue) -> str:
    if issue.problem_class in _NO_FILE_NAME:
        return "cohort folder"
    return clip(Path(issue.file).name)


def _public_cohort_summary(err: CohortValidationError) -> str:
    count = len(err.issues)
    shown = "; ".join(public_issue(issue) for issue in err.issues[:MAX_PUBLIC_ISSUES])
    more = count - MAX_PUBLIC_ISSUES
    tail = f"; and {more} more" if more > 0 else ""
    plural = "s" if count != 1 else ""
    return f"cohort data is invalid ({count} problem{plural}); refusing to train: {shown}{tail}"
