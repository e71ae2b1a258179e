"""WaitPolicy: when a batch forms, from explicit times only (no clock, no sleeping)."""

from __future__ import annotations

import math

import pytest

from batcher.policy import COMPANY_PROBE_EVERY, NOW, QueueState, WaitPolicy


def state(
    queued: int = 1,
    *,
    full: bool = False,
    oldest: float = 0.0,
    inflight: int = 0,
    closing: bool = False,
    urgent: bool = False,
) -> QueueState:
    return QueueState(queued=queued, full=full, oldest=oldest, inflight=inflight, closing=closing, urgent=urgent)


def dense(policy: WaitPolicy, gap_s: float = 0.001, arrivals: int = 10, *, start: float = 0.0, others: int = 0) -> None:
    """`arrivals` admissions `gap_s` apart from `start`, each finding `others` queued or running."""
    for index in range(arrivals):
        policy.arrived(start + index * gap_s, others=others)


def test_an_empty_queue_sleeps_until_woken() -> None:
    assert WaitPolicy(max_wait_s=0.002, instances=2).next_wait(state(0), now=1.0) == math.inf


def test_a_full_batch_runs_at_once() -> None:
    policy = WaitPolicy(max_wait_s=0.002, instances=2)
    dense(policy)
    assert policy.next_wait(state(32, full=True), now=0.0) is NOW


def test_no_wait_configured_means_run_at_once() -> None:
    policy = WaitPolicy(max_wait_s=0, instances=2)
    dense(policy)
    assert policy.next_wait(state(1), now=0.0) is NOW


def test_the_first_arrival_has_no_gap_estimate_and_runs_at_once() -> None:
    policy = WaitPolicy(max_wait_s=0.002, instances=2)
    policy.arrived(5.0)
    assert policy.next_wait(state(1, oldest=5.0), now=5.0) is NOW


def test_dense_arrivals_wait_out_the_window_from_the_oldest() -> None:
    policy = WaitPolicy(max_wait_s=0.010, instances=2)
    dense(policy, gap_s=0.001)
    assert policy.next_wait(state(1, oldest=1.000), now=1.004) == pytest.approx(0.006)


def test_sparse_arrivals_do_not_wait() -> None:
    policy = WaitPolicy(max_wait_s=0.010, instances=2)
    dense(policy, gap_s=0.5)
    assert policy.next_wait(state(1, oldest=10.0), now=10.0) is NOW


def test_the_window_closes_at_max_wait() -> None:
    policy = WaitPolicy(max_wait_s=0.010, instances=2)
    dense(policy)
    assert policy.next_wait(state(3, oldest=1.0), now=1.011) is NOW


def test_busy_instances_take_one_staged_full_batch_only() -> None:
    policy = WaitPolicy(max_wait_s=0.002, instances=2)
    assert policy.next_wait(state(5, inflight=2), now=0.0) == math.inf  # not full: wait for a free instance
    assert policy.next_wait(state(32, full=True, inflight=2), now=0.0) is NOW  # staged behind the busy ones
    assert policy.next_wait(state(32, full=True, inflight=3), now=0.0) == math.inf  # one staged already


def test_nothing_is_staged_while_high_priority_comes() -> None:
    policy = WaitPolicy(max_wait_s=0.002, instances=2)
    assert policy.next_wait(state(32, full=True, inflight=2, urgent=True), now=0.0) == math.inf
    assert policy.next_wait(state(32, full=True, inflight=1, urgent=True), now=0.0) is NOW  # a free instance


def test_closing_never_waits_for_company() -> None:
    policy = WaitPolicy(max_wait_s=10.0, instances=2)
    dense(policy)
    assert policy.next_wait(state(1, closing=True), now=0.0) is NOW


@pytest.mark.parametrize("others", [0, 1])
def test_waits_that_never_find_company_stop_except_for_probes(others: int) -> None:
    """Short gaps, but every wait ends with one request. A lone closed-loop client (its
    arrivals find the server empty) then never waits; where arrivals find others running,
    one decision in COMPANY_PROBE_EVERY still waits, to notice company returning."""
    policy = WaitPolicy(max_wait_s=0.040, instances=2)
    dense(policy, gap_s=0.002, others=others)
    decisions = []
    for _ in range(4 * COMPANY_PROBE_EVERY):
        wait = policy.next_wait(state(1, oldest=0.0), now=0.0)
        decisions.append(wait is not NOW)
        policy.formed(1)  # the batch formed with this request alone
    assert decisions[:3] == [True, True, True]  # it waits at first: company was expected
    later = decisions[2 * COMPANY_PROBE_EVERY :]
    if others:
        assert 1 <= sum(later) <= 3  # then only the periodic probe waits
    else:
        assert not any(later)  # then never: returning company would show in the arrivals first


def test_waits_that_find_company_keep_waiting() -> None:
    policy = WaitPolicy(max_wait_s=0.040, instances=2)
    dense(policy, gap_s=0.002)
    for _ in range(3 * COMPANY_PROBE_EVERY):
        assert policy.next_wait(state(1, oldest=0.0), now=0.0) is not NOW
        policy.formed(4)


def test_a_lone_client_may_take_every_core_until_arrivals_find_company() -> None:
    """`lone`: a closed-loop lone client's arrivals find the server empty; once arrivals find
    others queued or running (2 or more clients), a row run alone stays on the instances."""
    policy = WaitPolicy(max_wait_s=0.002, instances=2)
    dense(policy, gap_s=0.002, arrivals=20)
    assert policy.lone
    policy.arrived(0.05, others=1)
    assert policy.lone  # one overlap among many lone arrivals
    for index in range(5):
        policy.arrived(0.06 + index * 0.001, others=1 + index % 2)
    assert not policy.lone
    policy.arrived(0.1, others=0)
    assert not policy.lone  # one quiet arrival does not undo a crowd
    dense(policy, gap_s=0.002, start=0.2)
    assert policy.lone


def test_company_returning_after_a_lone_client_is_noticed() -> None:
    """A lone client never probes; when arrivals start finding others running, the probes
    resume, and once a wait finds company the batcher waits for it again."""
    policy = WaitPolicy(max_wait_s=0.040, instances=2)
    dense(policy, gap_s=0.002)
    for _ in range(2 * COMPANY_PROBE_EVERY):  # a lone client: no wait ever finds company
        policy.next_wait(state(1, oldest=0.0), now=0.0)
        policy.formed(1)
    assert policy.next_wait(state(1, oldest=0.0), now=0.0) is NOW
    dense(policy, gap_s=0.002, start=0.1, others=1)  # more clients: arrivals find others running
    waited = 0
    for _ in range(2 * COMPANY_PROBE_EVERY):
        if policy.next_wait(state(1, oldest=0.1), now=0.1) is not NOW:
            waited += 1
        policy.formed(3)  # and what waits finds company
    assert waited >= COMPANY_PROBE_EVERY  # a probe found company, and waiting resumed
