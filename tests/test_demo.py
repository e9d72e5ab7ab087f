"""The main job, as a new user runs it (smaller burst, same code path)."""

import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import ROOT


def demo(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    """`tracker.py demo ARGS` in a process group of its own: a demo that runs past the timeout is
    killed with every daemon, stand-in and API process it started, none left running after the test."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tracker.py"), "demo", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the demo ran over {timeout_s:g} s; its output:\n{stdout[-3000:]}\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def demo_output() -> str:
    result = demo("--returns", "1500", "--seconds", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_demo_runs_the_whole_pipeline_and_misses_nothing(demo_output: str) -> None:
    assert "Demo summary" in demo_output and "RESULT: OK" in demo_output
    assert "premature 0 · missing 0" in demo_output
    assert "SIGTERM → exit 0" in demo_output


def test_the_command_the_demo_suggests_runs_as_printed_and_warns_of_nothing(demo_output: str) -> None:
    suggested = next(line.split("try", 1)[1].strip() for line in demo_output.splitlines()
                     if line.strip().startswith("try "))
    result = subprocess.run(shlex.split(suggested), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tracker status")
    assert result.stderr == ""  # e.g. no warning that the demo's own config file is readable by others


def test_the_demo_with_three_instances_on_postgresql_loses_nothing_when_one_is_killed(pg_url: str) -> None:
    result = demo("--returns", "1500", "--seconds", "2", "--database-url", pg_url, "--instances", "3",
                  "--kill-one-at", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RESULT: OK" in result.stdout and "premature 0 · missing 0" in result.stdout
    assert "killed with SIGKILL: instance 3" in result.stdout
    status = next(line.split("try", 1)[1].strip() for line in result.stdout.splitlines()
                  if line.strip().startswith("try "))
    assert "postgresql://" in subprocess.run(shlex.split(status), capture_output=True, text=True, timeout=60).stdout


def test_several_demo_instances_need_a_database_url() -> None:
    result = demo("--instances", "2", timeout_s=60)
    assert result.returncode == 2 and "--database-url" in result.stderr


def test_the_demo_with_the_feed_down_pushes_every_return_through_the_api_and_misses_nothing() -> None:
    result = demo("--returns", "600", "--seconds", "2", "--feed-down")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RESULT: OK" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("by the API"))
    pushed = int(line.split()[3].replace(",", ""))
    assert pushed >= 600 and "through POST /v1/returns/batch" in line
    calls = next(line for line in result.stdout.splitlines() if line.strip().startswith("partner calls"))
    assert "missing 0" in result.stdout and "premature 0" in result.stdout and "returns" in calls
