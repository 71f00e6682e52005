"""Child processes for tests: started with a readiness line, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from queue import Empty, Queue

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    """A python -m child; readiness = a line on stdout starting with `ready_prefix`."""

    def __init__(
        self, args: list[str], env: Mapping[str, str] | None = None, log: Path | None = None,
        pythonpath: str | None = None,
    ):  # fmt: skip
        path = f"{pythonpath}:{ROOT}" if pythonpath else str(ROOT)
        full_env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = log
        self._stderr = open(log, "ab") if log else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=self._stderr,
            stdin=subprocess.DEVNULL, env=full_env, cwd=pythonpath or ROOT,
        )  # fmt: skip
        self.lines: Queue[str] = Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, prefix: str, timeout: float = 60.0) -> str:
        """Block until the child prints a line starting with prefix; fail if it exits first."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line {prefix!r} within {timeout}s; output: {self.output[-10:]}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    raise RuntimeError(
                        f"process exited with {self.popen.returncode} before {prefix!r}; "
                        f"output: {self.output[-10:]}; log: {self._log_tail()}"
                    ) from None
                continue
            if line.startswith(prefix):
                return line

    def _log_tail(self) -> str:
        if self.log and self.log.exists():
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-8:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._reader.join(5)
        if hasattr(self._stderr, "close"):
            self._stderr.close()  # type: ignore[union-attr]
        return self.popen.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
