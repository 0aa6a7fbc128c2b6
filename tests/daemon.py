"""Helpers to run the daemon as a real process and wait for conditions, never for fixed times."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from stream_forecaster.devbroker import free_port
from stream_forecaster.metrics import scrape


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition()`` until it returns a truthy value; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    """``stream-forecaster run`` in a subprocess with its own metrics port."""

    def __init__(self, overrides: list[str], log_path: Path):
        self.port = free_port()
        self.overrides = [*overrides, f"metrics.port={self.port}"]
        self.log_path = log_path
        args = [sys.executable, "-m", "stream_forecaster.cli", "run"]
        for o in self.overrides:
            args += ["--set", o]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=log_path.parent,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        return scrape(self.url + "/metrics")

    def wait_ready(self, timeout: float = 90) -> None:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
            return self.status("/readyz") == 200
        wait_for(ready, timeout, "the daemon to report ready")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
