"""CircuitBreaker: explicit states, pure time math on a fake clock, no sleeps."""
from comfy_ws_proxy.backends.breaker import BreakerState, CircuitBreaker

C, O, H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(**kw):
    return CircuitBreaker(failure_threshold=5, open_seconds=1.0, max_open_seconds=8.0, jitter=0.0, **kw)


def test_opens_after_five_consecutive_failures_only():
    b = make()
    for _ in range(4):
        b.record_failure(0)
    b.record_success(0)  # a success resets the count
    for _ in range(4):
        b.record_failure(0)
    assert b.state is C and b.allow(0)
    b.record_failure(0)
    assert b.state is O and not b.allow(0)


def test_one_probe_at_a_time_and_backoff_is_capped():
    b = make()
    for _ in range(5):
        b.record_failure(10.0)
    assert b.open_until == 11.0
    assert not b.try_begin_probe(10.9)          # not due yet
    assert b.try_begin_probe(11.0)              # due: half-open
    assert b.state is H and not b.allow(11.0)
    assert not b.try_begin_probe(11.0)          # a second probe is refused while one runs
    periods = []
    now = 11.0
    for _ in range(6):
        b.probe_failed(now)
        periods.append(b.open_until - now)
        now = b.open_until
        assert b.try_begin_probe(now)
    assert periods == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]  # doubles, capped at max_open_seconds
    b.probe_succeeded(now)
    assert b.state is C and b.allow(now) and b.consecutive_failures == 0


def test_state_sequence_is_recorded_and_reported():
    seen = []
    b = make(on_change=lambda old, new: seen.append(new))
    for _ in range(5):
        b.record_failure(0)
    b.try_begin_probe(1.0)
    b.probe_failed(1.0)
    b.try_begin_probe(3.0)
    b.probe_succeeded(3.0)
    assert seen == [O, H, O, H, C]
    assert b.transitions == [(C, O), (O, H), (H, O), (O, H), (H, C)]


def test_failures_while_open_do_not_extend_it():
    b = make()
    for _ in range(5):
        b.record_failure(0)
    until = b.open_until
    b.record_failure(0.5)
    assert b.open_until == until


def test_jitter_stays_within_bounds():
    values = iter([0.0, 1.0])
    b = CircuitBreaker(open_seconds=10, max_open_seconds=100, jitter=0.2, rng=lambda: next(values))
    assert b.open_period() == 8.0
    assert b.open_period() == 12.0
