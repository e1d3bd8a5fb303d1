"""Named, timed steps of a workflow and the report they add up to.

Every workflow (rehearsal, cutover, rollback, bisect) is a list of steps. A
step is run inside `Report.step`; it is timed, and an exception ends it as
*failed* with the one-line cause and, if the exception carries one, the
relevant log text (`StepError.log`). The workflow stops at the first failed
step: the report says which step, why, and what was left behind, so the
reader knows where to look and what to clean up.

The same report prints as text (for people) and as JSON (for scripts);
both come from `as_dict`, so they never disagree.
"""

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from ..errors import CowfsError

LOG_MAX_CHARS = 6000          # per failed step; pg_upgrade logs can be megabytes


class StepError(CowfsError):
    """A step failed; ``log`` holds the text that explains it (program output, log files)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


@dataclass
class Step:
    number: int
    name: str
    outcome: str = "running"            # ok | failed | skipped
    duration_s: float = 0.0
    detail: str = ""                    # one line: what it did or why it failed
    log: str = ""                       # failed steps only
    snapshot: Optional[str] = None      # VOL@SNAP taken right after the step


@dataclass
class Report:
    command: str
    steps: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)     # every VOL@SNAP taken, in order
    remains: list = field(default_factory=list)       # what is left for the user: volumes, mounts
    facts: dict = field(default_factory=dict)         # downtime_s, versions, counts...
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(s.outcome != "failed" for s in self.steps)

    @property
    def failed_step(self) -> Optional[Step]:
        return next((s for s in self.steps if s.outcome == "failed"), None)

    @contextmanager
    def step(self, name: str):
        """Time one step; a failure is recorded, then re-raised to stop the workflow."""
        step = Step(len(self.steps) + 1, name)
        self.steps.append(step)
        started = time.monotonic()
        try:
            yield step
        except BaseException as exc:
            step.outcome = "failed"
            step.detail = str(exc) if isinstance(exc, CowfsError) else f"{type(exc).__name__}: {exc}"
            step.log = _clip(getattr(exc, "log", ""))
            raise
        else:
            step.outcome = "ok"
        finally:
            step.duration_s = round(time.monotonic() - started, 3)

    def skip(self, name: str, why: str) -> Step:
        step = Step(len(self.steps) + 1, name, outcome="skipped", detail=why)
        self.steps.append(step)
        return step

    def as_dict(self) -> dict:
        failed = self.failed_step
        return dict(command=self.command, ok=self.ok, error=self.error,
                    failed_step=None if failed is None else failed.name,
                    steps=[vars(s).copy() for s in self.steps], snapshots=list(self.snapshots),
                    remains=list(self.remains), **self.facts)

    def write_json(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.as_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    def text(self) -> str:
        lines = [f"{self.command}: {'PASSED' if self.ok else 'FAILED'}"]
        for s in self.steps:
            snap = f"  [snapshot {s.snapshot}]" if s.snapshot else ""
            lines.append(f"  {s.number:>2}. {s.name:<26} {s.outcome:<7} {s.duration_s:>8.2f} s  "
                         f"{s.detail}{snap}")
        failed = self.failed_step
        if failed is not None and failed.log:
            lines.append(f"log of the failed step {failed.name}:")
            lines.extend("    " + line for line in failed.log.rstrip().splitlines())
        if self.error and failed is None:
            lines.append(f"error: {self.error}")
        for name, value in self.facts.items():
            lines.append(f"{name}: {_fmt(value)}")
        if self.snapshots:
            lines.append("snapshots taken: " + ", ".join(self.snapshots))
        for item in self.remains:
            lines.append(f"left in place: {item}")
        return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _clip(text: str) -> str:
    text = text or ""
    if len(text) <= LOG_MAX_CHARS:
        return text
    return "...(earlier lines cut)...\n" + text[-LOG_MAX_CHARS:]
