"""pytest plugin: append each failure's traceback to $FAIL_LOG as it happens (so a run cut short by a time
limit still leaves them). Use: PYTHONPATH=scripts/dev FAIL_LOG=fails.txt pytest -p pytest_fail_log ..."""

import os


def pytest_runtest_logreport(report):
    if report.failed:
        with open(os.environ.get("FAIL_LOG", "pytest_failures.txt"), "a") as log:
            log.write(f"=== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext[-2500:]}\n")
