"""How often a generating job reads the engine's output (``OutputPace``): a unit of one piece,
on its own. Paced reads through the real worker and engine: ``test_metrics.py``."""

from __future__ import annotations

import pytest

from hermes_worker.worker.execution import Attempt, JobRate, OutputPace
from hermes_worker.worker.stream import JobStream

# Powers of two, so that the arithmetic at the edges is exact.
PACE = OutputPace(interval_s=0.0625, min_jobs=8)
NOW = 1000.0


def generating(tokens: int, per_s: float = 64.0) -> Attempt:
    """A job ``tokens`` into its generation at ``per_s`` tokens a second (4 per interval)."""
    attempt = Attempt("job", 1, "token", NOW - 60, NOW - 30, JobStream("job"))
    attempt.first_token_at = NOW - tokens / per_s if tokens else None
    attempt.completion_tokens = tokens
    return attempt


def test_a_busy_worker_reads_a_job_once_per_interval() -> None:
    # Given 8 jobs generating, one of them 100 tokens into 512
    # Then it waits one interval before it reads again (NOW is on a beat)
    assert PACE.pause_s(8, generating(100), max_tokens=512, now=NOW) == PACE.interval_s


def test_paced_jobs_read_on_a_common_beat() -> None:
    # Given a job whose last read came a quarter of an interval after a beat
    # Then its next read is at the next beat, not a full interval later
    later = NOW + PACE.interval_s / 4
    assert PACE.pause_s(8, generating(100), max_tokens=512, now=later) == PACE.interval_s * 3 / 4


@pytest.mark.parametrize(
    ("running", "tokens", "why"),
    [
        (7, 100, "fewer jobs than min_jobs: every step is read"),
        (8, 0, "no token yet: the first is read at once"),
        (8, 503, "9 tokens left, 2 intervals' worth and 1: the end is read at once"),
        (8, 511, "1 token left"),
    ],
)
def test_no_pause_where_it_would_cost_latency(running: int, tokens: int, why: str) -> None:
    assert PACE.pause_s(running, generating(tokens), max_tokens=512, now=NOW) == 0.0, why


def test_the_last_pause_is_two_intervals_of_tokens_before_max_tokens() -> None:
    assert PACE.pause_s(8, generating(502), max_tokens=512, now=NOW) == PACE.interval_s  # 10 left
    assert PACE.pause_s(8, generating(503), max_tokens=512, now=NOW) == 0.0  # 9 left
    # A faster job stops pausing earlier: 16 tokens per interval, so 33 before the end
    fast = 256.0
    assert PACE.pause_s(8, generating(478, fast), max_tokens=512, now=NOW) == PACE.interval_s
    assert PACE.pause_s(8, generating(479, fast), max_tokens=512, now=NOW) == 0.0


def test_a_pace_of_zero_never_pauses() -> None:
    assert OutputPace().pause_s(128, generating(100), max_tokens=512, now=NOW) == 0.0


# 512 reads a second at one read per 1/16 s: up to 32 jobs read on every beat.
BOUNDED = OutputPace(interval_s=0.0625, min_jobs=8, max_reads_per_s=512)


@pytest.mark.parametrize(
    ("running", "beats"), [(8, 1), (32, 1), (33, 2), (64, 2), (65, 3), (128, 4)]
)
def test_many_jobs_read_on_a_beat_stretched_to_bound_the_reads_per_second(
    running: int, beats: int
) -> None:
    assert BOUNDED.period_s(running) == BOUNDED.interval_s * beats
    assert running / BOUNDED.period_s(running) <= BOUNDED.max_reads_per_s


def test_jobs_on_a_stretched_beat_still_read_together() -> None:
    # Given 128 jobs (a beat of 4 intervals, 0.25 s) that last read at different times
    # Then each reads next on the same multiple of the stretched beat
    for offset in (0.0, 0.01, 0.1, 0.2):
        pause = BOUNDED.pause_s(128, generating(100), max_tokens=512, now=NOW + offset)
        assert NOW + offset + pause == pytest.approx(NOW + 0.25), offset


def test_the_end_is_read_at_once_a_stretched_beat_earlier() -> None:
    # 64 tokens a second, a 0.25 s beat: 16 tokens per beat, so the last 33 are read at once
    assert BOUNDED.pause_s(128, generating(478), max_tokens=512, now=NOW) == 0.25
    assert BOUNDED.pause_s(128, generating(479), max_tokens=512, now=NOW) == 0.0


def test_a_read_bound_of_zero_keeps_the_beat_whatever_the_jobs() -> None:
    assert PACE.period_s(10_000) == PACE.interval_s


# Hands a job's output over once per up to 16 tokens; the beat and bound as BOUNDED's.
GATHERING = OutputPace(interval_s=0.0625, min_jobs=8, max_reads_per_s=512, max_stream_interval=16)


@pytest.mark.parametrize(
    ("running", "job_tokens_per_s", "interval", "why"),
    [
        (8, 128.0, 8, "128 a second, a 1/16 s beat: 8 tokens per beat"),
        (8, 125.0, 7, "7.8 tokens per beat: rounded down, never more than a beat holds"),
        (128, 64.0, 16, "64 a second on the beat stretched to 1/4 s: 16"),
        (128, 128.0, 16, "32 tokens per beat: at most max_stream_interval"),
        (32, 8.0, 1, "half a token per beat: every step"),
        (8, 0.0, 1, "no rate yet (a worker that just started): every step"),
        (7, 128.0, 1, "fewer jobs than min_jobs: not paced, every step"),
    ],
)
def test_a_paced_job_asks_the_engine_for_a_beat_of_tokens_at_a_time(
    running: int, job_tokens_per_s: float, interval: int, why: str
) -> None:
    assert GATHERING.stream_interval(running, job_tokens_per_s) == interval, why


def test_without_a_bound_or_a_pace_the_engine_hands_over_every_step() -> None:
    assert BOUNDED.stream_interval(128, 64.0) == 1  # max_stream_interval 1
    assert OutputPace(max_stream_interval=16).stream_interval(128, 64.0) == 1  # no pace


def test_a_jobs_rate_pools_the_reads_of_the_last_window_or_two() -> None:
    rate = JobRate(window_s=1.0)
    assert rate.per_s() == 0.0  # nothing read yet
    # Given two jobs' reads within a first window: 30 tokens in 0.5 job-seconds
    rate.add(10, 0.25, 100.0)
    rate.add(20, 0.25, 100.5)
    assert rate.per_s() == 60.0
    # When a window has passed, the next reads pool with the window before
    rate.add(90, 0.5, 101.0)
    assert rate.per_s() == 120.0 / 1.0
    # And after one more, the oldest window drops out
    rate.add(10, 0.5, 102.0)
    assert rate.per_s() == 100.0 / 1.0
    # Idle time counts for nothing: the rate stays what the last jobs had
    rate.add(0, 0.0, 110.0)
    assert rate.per_s() == 10 / 0.5
