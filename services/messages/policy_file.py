"""A message policy given as a file (`selaras evaluate messages --policy FILE`): visitor -> action, made by
another tool (a CRM's segment rules, a vendor's model), scored next to Selaras' own policies.

The file is CSV with a header or JSON Lines (both optionally .gz), one visitor per line, with the fields
`visitor_id` and `action`: a message template id of the catalog, or "none" (send nothing). Other columns
(a score, a segment name) are ignored. A line that cannot be used stops the reading with its number: a
missing column or field, an empty visitor id, an action that is neither "none" nor a known template, a
visitor given twice.

The rule for what the file does not say, applied to every decision of the log:

- a visitor of the log missing from the file gets "none" (a campaign file usually lists only the customers
  to contact); they are counted and the report says how many;
- a template that is not eligible at a decision (not among its logged candidates) is not sent there either,
  the same rule as the single-message policies ("always this message when eligible, else nothing").
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from services.messages.decision_log import NONE_ACTION
from services.messages.replay import LoggedDecisions
from services.profile.importer import open_binary

FIELDS: Final = ("visitor_id", "action")


class InvalidPolicyFile(ValueError):
    """The policy file cannot be used; the message names the line (and field)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class PolicyFile:
    name: str  # how the report names the policy: file:<file name>
    actions: dict[str, str]  # visitor id -> template id or "none"


@dataclass(frozen=True)
class FilePolicyActions:
    """The file's policy as the target action of every logged decision, and what the file did not cover."""

    actions: np.ndarray  # candidate row per decision, -1 = nothing
    missing_visitors: int  # visitors of the log not in the file (sent nothing)
    missing_decisions: int  # their decisions
    not_eligible: int  # decisions where the file's message was not eligible (sent nothing)
    unused_visitors: int  # visitors of the file without a decision in the log

    def to_json(self) -> dict[str, int]:
        return {
            "missing_visitors": self.missing_visitors,
            "missing_decisions": self.missing_decisions,
            "not_eligible": self.not_eligible,
            "unused_visitors": self.unused_visitors,
        }


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) per non-blank line; CSV cells are text, empty cells are left out."""
    with open_binary(path) as handle:
        name = path.name.removesuffix(".gz")
        if name.endswith(".csv"):
            text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
            reader = csv.reader(text)
            try:
                header = [column.strip() for column in next(reader, [])]
                missing = [column for column in FIELDS if column not in header]
                if missing:
                    raise InvalidPolicyFile(
                        1, f"the header needs the columns visitor_id and action (missing: {', '.join(missing)})"
                    )
                for cells in reader:
                    if any(cell.strip() for cell in cells):
                        record = {c: v.strip() for c, v in zip(header, cells, strict=False) if v.strip()}
                        yield reader.line_num, record
            except (UnicodeDecodeError, csv.Error) as exc:
                raise InvalidPolicyFile(reader.line_num + 1, f"not readable as UTF-8 CSV ({exc})") from exc
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise InvalidPolicyFile(number, f"not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise InvalidPolicyFile(number, 'not a JSON object like {"visitor_id": "c-1", "action": "none"}')
            yield number, record


def read_policy_file(path: Path, templates: Collection[str]) -> PolicyFile:
    """The file's visitor -> action map; raises InvalidPolicyFile at the first line that cannot be used.

    `templates`: the message template ids an action may name (besides "none")."""
    known = set(templates)
    actions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, record in _records(path):
        for name in FIELDS:
            value = record.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InvalidPolicyFile(number, f"{name}: missing")
            if not isinstance(value, str):
                raise InvalidPolicyFile(number, f"{name}: must be text, got {value!r}")
        visitor, action = str(record["visitor_id"]).strip(), str(record["action"]).strip()
        if action != NONE_ACTION and action not in known:
            shown = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
            raise InvalidPolicyFile(
                number, f"action: {action!r} is not a message template of the catalog ({shown}) nor 'none'"
            )
        if visitor in first_line:
            raise InvalidPolicyFile(number, f"visitor_id: {visitor!r} is already given on line {first_line[visitor]}")
        first_line[visitor] = number
        actions[visitor] = action
    if not actions:
        raise InvalidPolicyFile(1, "the file names no visitor")
    name = path.name
    for suffix in (".gz", ".jsonl", ".csv"):
        name = name.removesuffix(suffix)
    return PolicyFile(f"file:{name}", actions)


def file_policy_actions(data: LoggedDecisions, policy: PolicyFile) -> FilePolicyActions:
    """The file's action at every logged decision (see the module docstring for what the file leaves out)."""
    first_row: dict[tuple[int, str], int] = {}
    for row, (owner, template) in enumerate(zip(data.cand_owner.tolist(), data.cand_template, strict=True)):
        first_row.setdefault((owner, template), row)
    actions = np.full(data.size, -1, dtype=np.int64)
    missing: set[str] = set()
    missing_decisions = not_eligible = 0
    for i, visitor in enumerate(data.visitor_ids):
        action = policy.actions.get(visitor)
        if action is None:
            missing.add(visitor)
            missing_decisions += 1
            continue
        if action == NONE_ACTION:
            continue
        eligible = first_row.get((i, action))
        if eligible is None:
            not_eligible += 1
        else:
            actions[i] = eligible
    return FilePolicyActions(
        actions=actions,
        missing_visitors=len(missing),
        missing_decisions=missing_decisions,
        not_eligible=not_eligible,
        unused_visitors=len(set(policy.actions) - set(data.visitor_ids)),
    )
