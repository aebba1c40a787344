"""Which queued task runs next: ClassQueue, ResourcePool and rank, directly and as properties."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.scheduling.queues import BACKFILL_DEPTH, ClassQueue, ResourcePool, rank
from dspy_infra.scheduling.records import Need, TaskRecord
from dspy_infra.scheduling.tasks import TaskState

_ids = itertools.count()


def record(
    priority: int = 0,
    *,
    submitted_at: float = 0.0,
    seq: int | None = None,
    need: Need = (0.0, 0, 0),
) -> TaskRecord:
    n = next(_ids)
    return TaskRecord(
        task_id=f"t{n}",
        handler="h",
        task_class="c",
        priority=priority,
        payload="null",
        needs=(),
        workflow_id=None,
        max_attempts=1,
        timeout=None,
        need=need,
        submitted_at=submitted_at,
        seq=n if seq is None else seq,
    )


def always(_: TaskRecord) -> bool:
    return True


def drain(queue: ClassQueue, fits: Callable[[TaskRecord], bool] = always) -> list[TaskRecord]:
    popped = []
    while (r := queue.pop(fits)) is not None:
        popped.append(r)
    return popped


# -- rank -----------------------------------------------------------------------


def test_rank_without_aging_is_the_negated_priority() -> None:
    assert rank(5, 1000.0, 0) == -5.0
    assert rank(5, 0.0, 0) < rank(1, 0.0, 0)
    # Without aging, waiting longer is worth nothing.
    assert rank(3, 0.0, 0) == rank(3, 1e9, 0)


def test_rank_with_aging_lets_an_old_low_priority_task_overtake() -> None:
    old_low = rank(0, 1000.0, 60.0)
    young_high = rank(5, 1000.0 + 6 * 60.0, 60.0)  # six levels' worth of waiting later
    assert old_low < young_high
    # Submitted only four levels' worth earlier, the low one still loses.
    assert rank(5, 1000.0 + 4 * 60.0, 60.0) < old_low


@given(
    st.tuples(st.integers(0, 100), st.floats(0, 1e6)),
    st.tuples(st.integers(0, 100), st.floats(0, 1e6)),
    st.floats(0.5, 1000),
    st.floats(0, 1e6),
)
def test_rank_orders_as_effective_priority_at_any_moment(
    a: tuple[int, float], b: tuple[int, float], aging: float, later: float
) -> None:
    """priority + waited/aging, compared at any moment after both were submitted."""
    (p1, t1), (p2, t2) = a, b
    now = max(t1, t2) + later
    e1 = p1 + (now - t1) / aging
    e2 = p2 + (now - t2) / aging
    r1, r2 = rank(p1, t1, aging), rank(p2, t2, aging)
    if abs(e1 - e2) > 1e-6 * max(1.0, abs(e1), abs(e2)):
        assert (r1 < r2) == (e1 > e2)


# -- ClassQueue -------------------------------------------------------------------


def test_higher_priority_first_and_fifo_among_equals() -> None:
    queue = ClassQueue(aging=0)
    records = [record(p) for p in (1, 5, 1, 5, 3, 0, 3)]
    for r in records:
        queue.push(r)
    assert len(queue) == 7
    popped = drain(queue)
    expected = sorted(records, key=lambda r: (-r.priority, r.seq))
    assert [r.task_id for r in popped] == [r.task_id for r in expected]
    assert len(queue) == 0


def test_fifo_follows_seq_not_push_order() -> None:
    """A task queued again (a retry) goes back to its place among its equals."""
    queue = ClassQueue(aging=0)
    late, early = record(2, seq=10), record(2, seq=3)
    queue.push(late)
    queue.push(early)
    assert [r.seq for r in drain(queue)] == [3, 10]


def test_aging_lets_an_old_low_priority_task_overtake_in_the_queue() -> None:
    for aging, old_first in ((10.0, True), (0.0, False)):
        queue = ClassQueue(aging=aging)
        old_low = record(0, submitted_at=0.0)
        young_high = record(5, submitted_at=100.0)  # ten levels' worth of waiting later
        queue.push(old_low)
        queue.push(young_high)
        assert drain(queue) == ([old_low, young_high] if old_first else [young_high, old_low])


def test_backfill_skips_a_head_that_does_not_fit_and_keeps_it_queued() -> None:
    queue = ClassQueue(aging=0)
    big = record(9, need=(4.0, 0, 0))
    small = record(1, need=(1.0, 0, 0))
    queue.push(big)
    queue.push(small)
    assert queue.pop(lambda r: r.need[0] <= 2) is small
    assert len(queue) == 1
    assert queue.pop(lambda r: r.need[0] <= 2) is None
    assert len(queue) == 1
    assert queue.pop(always) is big  # still first once it fits
    assert len(queue) == 0


@pytest.mark.parametrize(
    ("fitting_at", "found"),
    [(0, True), (BACKFILL_DEPTH - 1, True), (BACKFILL_DEPTH, False), (BACKFILL_DEPTH + 5, False)],
)
def test_backfill_searches_at_most_backfill_depth_past_the_head(
    fitting_at: int, found: bool
) -> None:
    queue = ClassQueue(aging=0)
    records = [record(0) for _ in range(BACKFILL_DEPTH + 10)]
    for r in records:
        queue.push(r)
    target = records[fitting_at]
    asked: list[TaskRecord] = []

    def fits(r: TaskRecord) -> bool:
        asked.append(r)
        return r is target

    assert (queue.pop(fits) is target) == found
    assert len(asked) <= BACKFILL_DEPTH
    assert len(set(map(id, asked))) == len(asked)  # none looked at twice
    assert len(queue) == len(records) - found
    # What was skipped is still queued, in order.
    rest = drain(queue)
    assert rest == [r for r in records if not (found and r is target)]


def test_discarded_entries_do_not_count_against_the_backfill_depth() -> None:
    queue = ClassQueue(aging=0)
    discarded = [record(5) for _ in range(BACKFILL_DEPTH * 2)]
    kept = record(0)
    for r in [*discarded, kept]:
        queue.push(r)
    for r in discarded:
        queue.discard(r)
    assert len(queue) == 1
    assert queue.pop(always) is kept
    assert queue.pop(always) is None


def test_discard_forgets_a_task_and_a_discarded_task_can_be_queued_again() -> None:
    queue = ClassQueue(aging=0)
    a, b, c = record(1), record(2), record(3)
    for r in (a, b, c):
        queue.push(r)
    queue.discard(b)
    assert len(queue) == 2
    assert drain(queue) == [c, a]
    queue.push(b)  # queued again: its stale entry must not come back twice
    queue.push(a)
    assert drain(queue) == [b, a]
    assert len(queue) == 0


def test_a_record_that_left_the_queued_state_is_skipped() -> None:
    queue = ClassQueue(aging=0)
    gone, kept = record(9), record(0)
    queue.push(gone)
    queue.push(kept)
    gone.state = TaskState.CANCELLED
    queue.discard(gone)
    assert queue.pop(always) is kept


# A model of the queue: the queued records, picked by (rank, seq) with the backfill rule.
@st.composite
def queue_ops(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    ops = st.one_of(
        st.tuples(st.just("push"), st.integers(0, 5), st.integers(0, 3)),
        st.tuples(st.just("pop"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("discard"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("requeue"), st.integers(0, 1000), st.just(0)),
    )
    return draw(st.lists(ops, max_size=120))


@settings(max_examples=150, deadline=None)
@given(queue_ops(), st.sampled_from([0.0, 1.0, 7.5]))
def test_queue_matches_a_model(ops: list[tuple[str, int, int]], aging: float) -> None:
    queue = ClassQueue(aging=aging)
    queued: list[TaskRecord] = []
    popped: list[TaskRecord] = []
    clock = itertools.count()
    for op, a, b in ops:
        if op == "push":
            r = record(a, submitted_at=float(next(clock)), need=(float(b), 0, 0))
            queue.push(r)
            queued.append(r)
        elif op == "pop":
            capacity = a

            def fits(r: TaskRecord, capacity: int = capacity) -> bool:
                return r.need[0] <= capacity

            ordered = sorted(queued, key=lambda r: (rank(r.priority, r.submitted_at, aging), r.seq))
            expected = None
            for skipped, candidate in enumerate(ordered):
                if skipped >= BACKFILL_DEPTH:
                    break
                if fits(candidate):
                    expected = candidate
                    break
            got = queue.pop(fits)
            assert got is expected
            if got is not None:
                queued.remove(got)
                popped.append(got)
        elif op == "discard" and queued:
            r = queued.pop(a % len(queued))
            queue.discard(r)
        elif op == "requeue" and popped:
            r = popped.pop(a % len(popped))
            queue.push(r)
            queued.append(r)
        assert len(queue) == len(queued)


# -- ResourcePool -------------------------------------------------------------------


def test_capacity_error_names_what_can_never_fit() -> None:
    pool = ResourcePool(cpus=4, memory_mb=1000, gpus=["0", "1"])
    assert pool.capacity_error((4.0, 1000, 2)) is None
    assert "needs 5 CPUs; this machine has 4" in (pool.capacity_error((5.0, 0, 0)) or "")
    assert "needs 1001 MB" in (pool.capacity_error((0.0, 1001, 0)) or "")
    assert "needs 3 GPUs; this machine has 2" in (pool.capacity_error((0.0, 0, 3)) or "")


def test_fits_acquire_release() -> None:
    pool = ResourcePool(cpus=2, memory_mb=100, gpus=["0", "1", "2"])
    a = (1.0, 60, 2)
    assert pool.fits(a)
    leased_a = pool.acquire(a)
    assert leased_a == ("0", "1")
    assert not pool.fits((0.0, 0, 2))  # one GPU left
    assert not pool.fits((0.0, 41, 0))  # 40 MB left
    assert not pool.fits((1.5, 0, 0))  # 1 CPU left
    b = (1.0, 40, 1)
    assert pool.fits(b)
    assert pool.acquire(b) == ("2",)
    assert not pool.fits((0.001, 0, 0))
    pool.release(a, leased_a)
    assert pool.free_gpus == ["0", "1"]
    assert pool.used_cpus == 1.0
    assert pool.used_memory_mb == 40


def test_a_reservation_keeps_its_need_from_every_other_task() -> None:
    pool = ResourcePool(cpus=4, memory_mb=100, gpus=["0", "1", "2", "3"])
    pool.acquire((1.0, 10, 2))  # two GPUs taken: a 4-GPU task does not fit
    pool.reserve((1.0, 10, 4))
    assert not pool.fits((0.0, 0, 1)), "a GPU freed would go to the reservation"
    assert not pool.fits((0.0, 0, 4), reserved=True), "its own need is still taken"
    assert pool.fits((2.0, 80, 0)), "what the reservation leaves, others may use"
    assert not pool.fits((2.5, 0, 0))
    pool.release((1.0, 10, 2), ("0", "1"))
    assert pool.fits((0.0, 0, 4), reserved=True)
    assert not pool.fits((0.0, 0, 1))
    pool.unreserve()
    assert pool.fits((0.0, 0, 1))


def test_fractional_cpus_add_up() -> None:
    pool = ResourcePool(cpus=0.3, memory_mb=1, gpus=[])
    held = []
    for _ in range(3):
        assert pool.fits((0.1, 0, 0))
        pool.acquire((0.1, 0, 0))
        held.append((0.1, 0, 0))
    assert not pool.fits((0.1, 0, 0))
    for need in held:
        pool.release(need, ())
    assert pool.used_cpus == 0.0


def test_released_gpus_return_in_device_order() -> None:
    pool = ResourcePool(cpus=8, memory_mb=1, gpus=["3", "1", "2"])
    first = pool.acquire((0.0, 0, 1))
    second = pool.acquire((0.0, 0, 1))
    assert (first, second) == (("3",), ("1",))
    pool.release((0.0, 0, 1), second)
    pool.release((0.0, 0, 1), first)
    assert pool.free_gpus == ["3", "1", "2"]


pool_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.tuples(
                st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
                st.integers(0, 300),
                st.integers(0, 3),
            ),
            st.just(0),
        ),
        st.tuples(st.just("release"), st.just((0.0, 0, 0)), st.integers(0, 100)),
        st.tuples(
            st.just("reserve"),
            st.tuples(st.sampled_from([0.0, 1.0, 2.0]), st.integers(0, 500), st.integers(0, 3)),
            st.just(0),
        ),
        st.tuples(st.just("unreserve"), st.just((0.0, 0, 0)), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(pool_ops, st.integers(0, 4))
def test_pool_never_over_capacity_and_gpu_leases_disjoint(
    ops: list[tuple[str, Need, int]], gpu_count: int
) -> None:
    gpus = [f"g{i}" for i in range(gpu_count)]
    pool = ResourcePool(cpus=2.0, memory_mb=500, gpus=gpus)
    held: list[tuple[Need, tuple[str, ...]]] = []
    reserved: Need = (0.0, 0, 0)
    for op, need, index in ops:
        if op == "reserve":
            reserved = need
            pool.reserve(need)
        elif op == "unreserve":
            reserved = (0.0, 0, 0)
            pool.unreserve()
        elif op == "acquire":
            if pool.capacity_error(need) is not None:
                continue
            # A need it takes must leave the reservation whole.
            kept = [r if n else 0 for n, r in zip(need, reserved, strict=True)]
            expected_fit = (
                sum(n[0] for n, _ in held) + need[0] + kept[0] <= 2.0 + 1e-9
                and sum(n[1] for n, _ in held) + need[1] + kept[1] <= 500
                and sum(n[2] for n, _ in held) + need[2] + kept[2] <= gpu_count
            )
            assert pool.fits(need) == expected_fit
            if reserved != (0.0, 0, 0):
                own_fit = (
                    sum(n[0] for n, _ in held) + need[0] <= 2.0 + 1e-9
                    and sum(n[1] for n, _ in held) + need[1] <= 500
                    and sum(n[2] for n, _ in held) + need[2] <= gpu_count
                )
                assert pool.fits(need, reserved=True) == own_fit
            if expected_fit:
                leased = pool.acquire(need)
                assert len(leased) == need[2]
                held.append((need, leased))
        elif held:
            held_need, leased = held.pop(index % len(held))
            pool.release(held_need, leased)
        leases = [g for _, leased in held for g in leased]
        assert len(leases) == len(set(leases)), "a device leased twice"
        assert sorted(leases + pool.free_gpus) == sorted(gpus)
        assert pool.free_gpus == [g for g in gpus if g in pool.free_gpus]
        assert pool.used_cpus <= pool.cpus + 1e-9
        assert pool.used_memory_mb <= pool.memory_mb
        assert pool.used_cpus == pytest.approx(sum(n[0] for n, _ in held), abs=1e-9)
        assert pool.used_memory_mb == sum(n[1] for n, _ in held)
    for need, leased in held:
        pool.release(need, leased)
    assert pool.used_cpus == 0.0
    assert pool.used_memory_mb == 0
    assert pool.free_gpus == gpus
