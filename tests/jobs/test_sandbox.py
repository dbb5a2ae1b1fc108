"""The code sandbox: results of good and bad programs, and the limits that stop hostile ones."""

import os
import time
from pathlib import Path

import pytest

from moeray.jobs.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256, max_processes=8)


def sandbox_processes() -> list[int]:
    """Processes still working in a sandbox folder (none may outlive a run)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd").startswith("/tmp/moeray-sandbox-"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_counts_the_tests_that_pass():
    result = run_python("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(2, 2) == 5"], LIMITS)
    assert (result.passed, result.total, result.fraction) == (1, 2, 0.5)
    assert result.error.startswith("AssertionError")
    assert run_python("x = 1\n", ["assert x == 1"], LIMITS).all_passed


@pytest.mark.parametrize("code, error", [
    ("def f(:\n", "SyntaxError"),
    ("raise SystemExit(3)\n", "SystemExit"),
    ("import os\nos._exit(3)\n", "exited with status 3"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by signal 9"),
])
def test_a_crash_scores_zero_and_says_why(code, error):
    result = run_python(code, ["assert True"], LIMITS)
    assert result.passed == 0 and error in result.error


def test_an_infinite_loop_is_killed_at_the_timeout():
    started = time.monotonic()
    result = run_python("while True:\n    pass\n", ["assert True"], LIMITS)
    assert result.passed == 0 and "timed out after 3 s" in result.error
    assert time.monotonic() - started < LIMITS.timeout_s + 2
    assert sandbox_processes() == []


def test_a_memory_bomb_hits_the_memory_limit():
    result = run_python("block = []\nwhile True:\n    block.append(bytearray(16 * 1024 * 1024))\n", ["assert True"],
                        LIMITS)
    assert result.passed == 0 and ("MemoryError" in result.error or "timed out" in result.error)
    assert run_python("x = bytearray(64 * 1024 * 1024)\n", ["assert len(x) > 0"], LIMITS).all_passed  # below it


def test_a_fork_bomb_is_contained_and_leaves_nothing_behind():
    started = time.monotonic()
    result = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                        ["assert True"], LIMITS)
    assert result.passed == 0
    assert time.monotonic() - started < LIMITS.timeout_s + 4
    assert sandbox_processes() == []
    # The machine still starts processes: the next run is unaffected.
    assert run_python("import subprocess\n", ["assert 1 + 1 == 2"], LIMITS).all_passed


def test_no_secrets_reach_the_code(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("MOERAY_API_KEYS", "k1")
    result = run_python("import os\nnames = sorted(os.environ)\n",
                        ["assert not any('KEY' in n or n.startswith('AWS') or n.startswith('MOERAY') for n in names)"],
                        LIMITS)
    assert result.all_passed, result.error


def test_printing_a_fake_report_does_not_count():
    code = "print('MOERAY-SANDBOX {\"loaded\": true, \"passed\": [true], \"error\": null}')\nraise ValueError('no')\n"
    assert run_python(code, ["assert True"], LIMITS).passed == 0
