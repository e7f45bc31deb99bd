"""How the engine drops one request without stopping: a request whose rows cannot be built, whose outputs cannot be
finished, or whose adapter cannot be loaded ends with finish reason "error" and its pages free, and (request id,
exception) waits in `failed` for the caller (the server answers it with its error; the offline LLM raises it). The
engine keeps serving every other request.

Mixed into LLMEngine, whose `requests`, `output_processor`, `failed`, `model_config` and `_sampling_row` it uses.
"""

from __future__ import annotations

import logging

from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.worker.sampler import build_tensors, choose_mode

logger = logging.getLogger("qwenjax")


class RequestFailures:
    def _fail_culprits(self, out: SchedulerOutput, exc: Exception) -> None:
        """Building a step's inputs raised: fails the requests whose rows raise on their own (their pages are
        freed, the step is not dispatched, the next step schedules the others again). Re-raises `exc` when no single
        row does: the fault is not one request's."""
        culprits = {}
        for r in out.rows:
            try:
                row = self._sampling_row(r)
                choose_mode([row])
                build_tensors([row], num_rows=1, vocab_size=self.model_config.vocab_size, with_history=False)
            except Exception as e:  # noqa: BLE001 - this row is the fault
                culprits.setdefault(r.seq.request_id, e)
        if not culprits:
            raise exc
        for rid, e in culprits.items():
            self.fail_request(rid, e)

    def fail_request(self, request_id: str, exc: BaseException) -> None:
        """Ends a request that a step could not handle: its sequences finish with reason "error", their pages are
        freed, and (request id, exc) goes to `failed` for the caller. Touches nothing that could raise again."""
        logger.error("request %s failed in the engine and was dropped: %s: %s", request_id, type(exc).__name__, exc)
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.error = exc
        for seq in req.seqs:
            if not seq.finished:
                self.output_processor.finish(seq, "error", flush=False, text=False)
        self.failed.append((request_id, exc))

    def _fail_lora(self, lora_int_id: int, exc: BaseException) -> None:
        for rid in [r.request_id for r in self.requests.values() if r.seqs[0].lora_int_id == lora_int_id]:
            self.fail_request(rid, exc)

    def take_failed(self) -> list[tuple[str, BaseException]]:
        """The requests failed since the last call: (request id, exception)."""
        failed, self.failed = self.failed, []
        return failed
