"""The main job, as a new user runs it (smaller burst, same code path)."""

import subprocess
import sys

from conftest import ROOT


def test_demo_runs_the_whole_pipeline_and_misses_nothing() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tracker.py"), "demo", "--returns", "1500", "--seconds", "2"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "Demo summary" in out and "RESULT: OK" in out
    assert "premature 0 · missing 0" in out
    assert "SIGTERM → exit 0" in out
