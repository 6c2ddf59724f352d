"""Fault injection: a plan's faults applied at their planned times, on their own thread.

Each fault applied leaves a :class:`FaultRecord` (start and end relative to the run's
start); the failover actions are carried out by :mod:`.failover`.
"""

from __future__ import annotations

import threading
import time
from typing import Literal, TypedDict, TypeVar

from pgwarden._redact import redact
from pgwarden.stress import failover
from pgwarden.stress.scenarios import FaultStep, Plan
from pgwarden.stress.targets import Say, Target

__all__ = ["FaultRecord", "Injector"]


class _FaultRecordKeys(TypedDict):
    label: str
    action: str
    start: float
    end: float | None
    recover: bool


class FaultRecord(_FaultRecordKeys, total=False):
    """One fault as it happened (the ``faults`` of a client's result). Times in seconds
    after the run's start; ``end`` is None while a fault with a duration is applied."""

    detail: str
    # The failover actions (see :func:`pgwarden.stress.failover.apply`).
    promoted_at: float
    promotion_ms: float
    demote: str


class Injector(threading.Thread):
    """Applies a plan's faults at their times (relative to ``t_go``), on its own thread."""

    def __init__(self, plan: Plan, target: Target, t_go: float, say: Say) -> None:
        super().__init__(name="stress-faults", daemon=True)
        self.plan = plan
        self.target = target
        self.t_go = t_go
        self.say = say
        self.abort = threading.Event()
        self.faults: list[FaultRecord] = []
        self.errors: list[str] = []
        self.current = ""

    def _now(self) -> float:
        return time.monotonic() - self.t_go

    def run(self) -> None:
        timeline: list[tuple[float, int, str, FaultStep, int]] = []
        for i, step in enumerate(self.plan.faults):
            timeline.append((step.at, 0, "apply", step, i))
            if step.duration > 0:
                timeline.append((step.at + step.duration, 1, "heal", step, i))
        timeline.sort(key=lambda item: (item[0], item[1]))
        records: dict[int, FaultRecord] = {}
        for at, _, what, step, i in timeline:
            if self.abort.wait(max(0.0, at - self._now())):
                break
            try:
                if what == "apply":
                    records[i] = self._apply(step)
                else:
                    self._heal(step, records.get(i))
            except Exception as exc:
                message = f"{step.label} ({what}) at {self._now():.1f}s failed: {exc}"
                self.errors.append(redact(message))
                self.say(f"    ! {redact(message)}")
        self.current = ""

    def _apply(self, step: FaultStep) -> FaultRecord:
        target = self.target
        record: FaultRecord = {
            "label": step.label,
            "action": step.action,
            "start": round(self._now(), 3),
            "end": None,
            "recover": step.recover,
        }
        self.faults.append(record)
        self.current = step.label
        if step.action in ("restart_fast", "restart_immediate"):
            mode: Literal["fast", "immediate"] = (
                "fast" if step.action == "restart_fast" else "immediate"
            )
            _need(target.server, step).restart(mode)
            end = round(self._now(), 3)
            record["end"] = end
            record["detail"] = f"down for {end - record['start']:.2f}s"
            self.current = ""
        elif step.action == "kill":
            killed = target.kill_ours(step.value)
            record["end"] = round(self._now(), 3)
            record["detail"] = f"{killed} backend(s) terminated"
            self.current = ""
        elif step.action == "latency":
            _need(target.proxy, step).set_latency(step.value)
        elif step.action == "reset":
            _need(target.proxy, step).reset()
        elif step.action == "blackhole":
            _need(target.proxy, step).blackhole()
        elif step.action == "mark":
            pass
        elif step.action in failover.ACTIONS:
            record.update(failover.apply(step.action, target, self.t_go))  # type: ignore[typeddict-item]
            record["end"] = round(self._now(), 3)
            self.current = ""
        else:  # pragma: no cover - Action is a closed Literal
            raise ValueError(step.action)
        return record

    def _heal(self, step: FaultStep, record: FaultRecord | None) -> None:
        if step.action == "latency":
            _need(self.target.proxy, step).set_latency(0.0)
        elif step.action in ("reset", "blackhole"):
            _need(self.target.proxy, step).heal()
        if record is not None:
            record["end"] = round(self._now(), 3)
        self.current = ""


_T = TypeVar("_T")


def _need(part: _T | None, step: FaultStep) -> _T:
    """The target's server or proxy that ``step`` acts on (a plan that needs one has one)."""
    if part is None:
        raise RuntimeError(f"{step.label}: this target has nothing to {step.action}")
    return part
