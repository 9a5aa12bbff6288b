"""How often a generating job reads the engine's output (``OutputPace``): a unit of one piece,
on its own. Paced reads through the real worker and engine: ``test_metrics.py``."""

from __future__ import annotations

import pytest

from hermes_worker.execution import Attempt, OutputPace
from hermes_worker.stream import JobStream

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
