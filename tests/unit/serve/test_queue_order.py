"""The request queue stamps a job's queued_at when it enters the queue, not when it was built.

Prompts are prepared concurrently (tokenizing a long one takes a while), so a job built first
can be queued second; the records' queued_at must follow the queue's order, the order the
generation thread serves them in.
"""

from __future__ import annotations

from typing import Any, cast

from edgetp.config.generation import GenerationConfig, SamplingConfig
from edgetp.serve.generation import GenerationQueue
from edgetp.serve.jobs import Job


class CompleteMaster:
    """The one thing submit asks of the master: which worker ranks are missing."""

    def missing_ranks(self) -> list[int]:
        return []


def make_job() -> Job:
    return Job("chat", [1, 2, 3], SamplingConfig(), GenerationConfig(max_new_tokens=4),
               stream=False)


def test_queued_at_follows_the_order_jobs_enter_the_queue() -> None:
    queue = GenerationQueue(cast(Any, CompleteMaster()), capacity=4)
    built_first, built_second = make_job(), make_job()
    assert built_first.record.queued_at <= built_second.record.queued_at
    queue.submit(built_second)
    queue.submit(built_first)
    records = list(queue.records)
    assert [r.id for r in records] == [built_second.id, built_first.id]
    assert records[0].queued_at <= records[1].queued_at
    assert queue.snapshot()[0] == 2
