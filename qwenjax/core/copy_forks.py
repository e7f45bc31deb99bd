"""The copies of an n > 1 request (indices 1..n-1) in the scheduler: never prefilled, they wait until the first
copy's prompt is computed and then fork from it (its prompt pages shared, one page of their own, a decode row at the
prompt's last token). See core/scheduler.py's docstring for where this sits in a step.

Mixed into Scheduler, whose `waiting`, `running`, `blocks`, `policy`, `config`, `num_waiting_copies`, `_start` and
`_lora_ready` it uses.
"""

from __future__ import annotations

from qwenjax.core.scheduler_output import Fork
from qwenjax.core.sequence import Sequence


class CopyForks:
    def _copy_state(self, seq: Sequence) -> str | None:
        """For a copy (index > 0 of an n > 1 request) that never ran: "wait" while its parent's prompt is not
        computed, "fork" once its pages are pinned; None for every other sequence (they start the usual way)."""
        if not seq.copy_pending:
            return None
        p = seq.parent
        if p.fork_pages is not None:
            return "fork"
        return None if p.finished else "wait"

    def _copy_started(self, seq: Sequence) -> None:
        """A copy starts (forked, or the usual way when its parent ended before its prompt was computed) or
        leaves: one fewer for its parent's pins."""
        seq.copy_pending = False
        self.num_waiting_copies -= 1
        parent = seq.parent
        parent.num_unforked -= 1
        if parent.num_unforked == 0 and parent.fork_pages is not None:
            self.blocks.release(parent.fork_pages)
            parent.fork_pages = None

    def _fork_waiting(self) -> list[Fork]:
        """Starts waiting copies whose parent's prompt is computed, in queue order, while slots and pages last: each
        shares the parent's prompt pages (one more reference each), gets one page of its own for the prompt's last
        token (a device copy of the parent's page where that page holds earlier prompt positions), and starts at
        num_computed = prompt length - 1, so its next step is a decode row that samples its first token. No prefill
        runs per copy, and all the copies decode together.

        Fairness: forking stops at the first waiting sequence that is not a copy (it is admitted the usual way,
        first), and a request's copies that did not fit go to the back of the queue, so a later request waits for at
        most one round of another request's copies, not for all n of them."""
        forks: list[Fork] = []
        if not self.num_waiting_copies:
            return forks
        rotated: set[int] = set()
        ps = self.blocks.page_size
        for seq in self.policy.order(self.waiting):
            state = self._copy_state(seq)
            if state is None:
                break
            if state == "wait":
                continue
            if len(self.running) >= self.config.max_num_seqs or not self.blocks.can_admit(1):
                break
            if not self._lora_ready(seq, []):
                continue  # its parent ended and the adapter lost its slot: it waits for one
            p, L = seq.parent, len(seq.prompt_token_ids)
            keep = (L - 1) // ps  # pages wholly before the last prompt token: shared as they are
            table = self.blocks.share(p.fork_pages[:keep])
            self.blocks.grow(table, keep * ps + 1)
            src = p.fork_pages[keep] if (L - 1) % ps else None  # read before _start: the last copy unpins
            seq.block_table = table
            seq.block_hashes = list(p.block_hashes[:keep])
            seq.num_computed = L - 1
            self._start(seq)
            forks.append(Fork(src, table[keep], seq.slot, seq.prompt_token_ids))
            rotated.add(id(p))
        for seq in [s for s in self.waiting if s.parent is not None and id(s.parent) in rotated]:
            self.waiting.remove(seq)  # the copies that did not fit wait behind everyone queued now
            self.waiting.append(seq)
        return forks
