"""Run untrusted Python (model-written code and its unit tests) in a limited subprocess.

Contract: `run_python(code, tests, limits)` returns a `SandboxResult` and never raises for
anything the code does: a crash, a syntax error, a timeout, an infinite loop, a memory bomb
or a fork bomb is a result with `passed` counting the tests that passed before it (usually 0)
and `error` saying what happened. The limits:
- wall-clock: the whole process group (and, where available, the whole cgroup) is killed
  after `timeout_s`; descendants are killed when the run ends, whatever its outcome;
- memory: `RLIMIT_AS` of `memory_mb` for the process and each child;
- processes: `max_processes` through a pids cgroup where this process may create one (the
  only limit that binds root, whom `RLIMIT_NPROC` exempts), else `RLIMIT_NPROC` over the
  user's current count;
- CPU time, file size and core dumps are bounded too; the working directory is a fresh
  temporary folder that is deleted afterwards;
- environment: nothing is inherited (no AWS_*, no API keys, no PYTHONPATH): the child gets a
  PATH, a locale and HOME set to its folder, and runs `python -I` (isolated mode).
Each test is one Python source string (usually an `assert`), run after the code in the same
namespace; `passed` counts those that ran without raising.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The child's program: enter its cgroup and limits (here rather than in a preexec_fn, which is
# unsafe in a threaded parent), execute the code, then each test, and print one JSON line.
# It reads its input from a file rather than argv (long programs), deletes it, and marks its
# report with a nonce from that file, so that the code's own prints are not taken for it. (Code
# written to cheat could still find the nonce in the runner's frame: this bounds resources, it
# does not make rewards adversary-proof.)
_RUNNER = r"""
import json, os, resource, sys
out = sys.__stdout__
payload = json.load(open(sys.argv[1]))
os.remove(sys.argv[1])  # the nonce that marks the report line leaves with it
if payload["cgroup"]:
    with open(payload["cgroup"], "w") as procs:
        procs.write(str(os.getpid()))
for name, value in payload["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
sys.stdout = open("stdout.txt", "w")
namespace = {"__name__": "__main__"}
results = {"loaded": False, "passed": [], "error": None}
try:
    exec(compile(payload["code"], "solution.py", "exec"), namespace)
    results["loaded"] = True
except BaseException as err:
    results["error"] = f"{type(err).__name__}: {err}"[:300]
if results["loaded"]:
    for test in payload["tests"]:
        try:
            exec(compile(test, "test.py", "exec"), namespace)
            results["passed"].append(True)
        except BaseException as err:
            results["passed"].append(False)
            results["error"] = results["error"] or f"{type(err).__name__}: {err}"[:300]
out.write(payload["nonce"] + " " + json.dumps(results) + "\n")
out.flush()
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    max_processes: int = 16
    cpu_s: int = 10
    file_mb: int = 16


@dataclass
class SandboxResult:
    passed: int  # tests that ran without raising
    total: int  # tests given
    error: str | None = None  # the first failure, a timeout or a crash; None when all passed
    duration_s: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


class _PidsCgroup:
    """A pids cgroup (v1 or v2) of its own for one run, or nothing where none can be made."""

    def __init__(self, max_processes: int):
        self.path: Path | None = None
        for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
            if not (root / "cgroup.procs").exists() or (root.name == "cgroup" and not self._v2_has_pids(root)):
                continue
            candidate = root / f"moeray-sandbox-{uuid.uuid4().hex[:12]}"
            try:
                candidate.mkdir()
                (candidate / "pids.max").write_text(str(max_processes))
            except OSError:
                try:
                    candidate.rmdir()
                except OSError:
                    pass
                continue
            self.path = candidate
            return

    @staticmethod
    def _v2_has_pids(root: Path) -> bool:
        try:
            return "pids" in (root / "cgroup.subtree_control").read_text().split()
        except OSError:
            return False

    def kill_all(self) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        try:
            self.path.rmdir()
        except OSError as err:  # still populated after 2 s: leave it, say so
            log.warning("sandbox cgroup %s not removed: %s", self.path, err)


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _rlimits(limits: SandboxLimits, nproc: int | None) -> dict[str, int]:
    mb = 1024 * 1024
    rlimits = {"RLIMIT_AS": limits.memory_mb * mb, "RLIMIT_CPU": limits.cpu_s, "RLIMIT_FSIZE": limits.file_mb * mb,
               "RLIMIT_CORE": 0}
    if nproc is not None:
        rlimits["RLIMIT_NPROC"] = nproc
    return rlimits


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    started = time.monotonic()
    cgroup = _PidsCgroup(limits.max_processes)
    # RLIMIT_NPROC counts all of the user's processes, so the allowance is on top of today's.
    nproc = None if cgroup.path is not None or os.getuid() == 0 else _user_process_count() + limits.max_processes
    with tempfile.TemporaryDirectory(prefix="moeray-sandbox-") as folder:
        nonce = f"moeray-sandbox-{uuid.uuid4().hex}"
        payload = {"code": code, "tests": list(tests), "nonce": nonce, "rlimits": _rlimits(limits, nproc),
                   "cgroup": str(cgroup.path / "cgroup.procs") if cgroup.path is not None else None}
        (Path(folder) / "payload.json").write_text(json.dumps(payload))
        (Path(folder) / "runner.py").write_text(_RUNNER)
        environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "PYTHONDONTWRITEBYTECODE": "1"}
        report_path = Path(folder) / "report.txt"  # a file, not a pipe: RLIMIT_FSIZE bounds it
        try:
            with open(report_path, "wb") as report:
                process = subprocess.Popen([sys.executable, "-I", "runner.py", "payload.json"], cwd=folder,
                                           env=environment, stdin=subprocess.DEVNULL, stdout=report,
                                           stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:  # e.g. no process slot left at all
            cgroup.kill_all()
            return SandboxResult(0, len(tests), f"could not start the sandbox: {err}", time.monotonic() - started)
        try:
            process.wait(timeout=limits.timeout_s)
            error = None
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            error = f"timed out after {limits.timeout_s:g} s"
        finally:
            _kill_group(process)  # descendants left behind by a run that ended, too
            cgroup.kill_all()
        with open(report_path, "rb") as report:
            report.seek(max(0, report_path.stat().st_size - 65536))
            tail = report.read().decode("utf-8", "replace")
    return _result(tail, nonce, len(tests), error, process.returncode, time.monotonic() - started)


def _result(stdout: str, nonce: str, total: int, error: str | None, returncode: int | None,
            duration: float) -> SandboxResult:
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce + " "):
            try:
                report = json.loads(line[len(nonce) + 1:])
            except json.JSONDecodeError:
                continue
            passed = sum(report["passed"])
            return SandboxResult(passed, total, error or report["error"], duration)
    if error is None:
        error = (f"killed by signal {-returncode}" if returncode is not None and returncode < 0
                 else f"exited with status {returncode}")
    return SandboxResult(0, total, error, duration)
