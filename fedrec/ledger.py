"""The runner's book of a run: every per-round row reaches the recorder through here.

Data flows one way: the strategy returns a `RoundResult` (strategies.fedrec), the adversary
hook returns its diagnostics, the runner (fedrec.engine or fedrec.server_app) hands both to
`RunLedger.fit`, which adds the running totals and the detection scores and writes one row.
Nothing else writes the recorder, so a round's row is complete when it is written.
"""

from __future__ import annotations

from collections import Counter


class RunLedger:
    """recorder: a fedrec.results.RunRecorder (or None); detection: a
    fedrec.evaluation.DetectionTracker scoring the defense's drops (simulation only, or None)."""

    def __init__(self, recorder=None, detection=None):
        self.recorder = recorder
        self.detection = detection
        self.invalid: Counter = Counter()  # validation drops by reason, over the run
        self.failures = 0  # client failures (a ClientApp that raised or timed out), over the run

    def fit(self, rnd: int, users, result, attack: dict | None = None,
            extra: dict | None = None) -> dict:
        """One round's fit row: the strategy's metrics, the running invalid total, detection
        scores of the round's drops among `users`, the attack's diagnostics and `extra`."""
        self.invalid.update(result.invalid)
        self.failures += int(result.metrics.get("failures", 0))
        row = {**result.metrics, "invalid_total": sum(self.invalid.values())}
        if self.detection is not None:
            row.update(self.detection.update(users, result.dropped, result.dropped_by))
        row.update(attack or {})
        row.update(extra or {})
        if self.recorder is not None:
            self.recorder.log_fit(rnd, row)
        return row

    def eval(self, rnd: int, metrics: dict, final: bool, extra: dict | None = None) -> dict:
        row = {**metrics, **(extra or {})}
        if self.recorder is not None:
            self.recorder.log_eval(rnd, row, final)
        return row

    def state_dict(self) -> dict:
        return {"invalid": dict(self.invalid), "failures": self.failures,
                "detection": None if self.detection is None else self.detection.state_dict()}

    def load_state_dict(self, state: dict):
        self.invalid = Counter(state["invalid"])
        self.failures = int(state["failures"])
        if self.detection is not None and state["detection"] is not None:
            self.detection.load_state_dict(state["detection"])

    def totals(self) -> dict:
        """The run's summary counts (summary.json)."""
        out = {"invalid_uploads": dict(self.invalid),
               "invalid_uploads_total": sum(self.invalid.values()), "client_failures": self.failures}
        if self.detection is not None:
            out["detection"] = self.detection.summary()
        return out
