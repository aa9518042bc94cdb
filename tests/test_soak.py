"""The soak benchmark's short mode: 8 clients for 30 s against a real TorchServe (docs/operations.md, Reliability)."""

import pytest

pytestmark = pytest.mark.serving


def test_short_soak_answers_everything_without_restarts_or_memory_growth(tmp_path):
    from benchmarks.soak import run_soak

    report = run_soak(duration=30, clients=8, work=tmp_path)
    assert report.requests >= 50, report
    assert report.wrong_status == 0 and report.lost == 0, report.errors[:5]
    assert report.valid_ok > 0 and report.invalid_rejected > 0
    assert report.worker_restarts == 0
    assert report.rss_growth_percent < 10, report
