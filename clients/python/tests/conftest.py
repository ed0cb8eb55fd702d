"""A real `multiagents serve` per test: embedded, on a free loopback port, in
a temporary directory; killed (SIGKILL) at the end. The binary is
$MULTIAGENTS_BIN, or target/debug/multiagents of this checkout."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiagents_client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def binary() -> str:
    path = os.environ.get("MULTIAGENTS_BIN") or str(ROOT / "target" / "debug" / "multiagents")
    if not Path(path).exists():
        pytest.fail(f"no multiagents binary at {path}: run `cargo build -p multiagents-cli` or set MULTIAGENTS_BIN")
    return path


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Served:
    """One `multiagents serve` process, which can be killed and started again
    on the same port and store."""

    def __init__(self, store: Path, extra: Optional[List[str]] = None):
        self.store = store
        self.extra = extra or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None
        self.log: List[str] = []

    def start(self) -> "Served":
        self.process = subprocess.Popen(
            [binary(), "serve", "--listen", f"127.0.0.1:{self.port}", "--store", str(self.store), *self.extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        for line in self.process.stderr:
            self.log.append(line)
            if re.search(r"serving http://", line):
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail("serve stopped before serving:\n" + "".join(self.log))
        # Keep draining stderr, so that the service never blocks on it.
        stream = self.process.stderr
        threading.Thread(target=lambda: [self.log.append(l) for l in stream], daemon=True).start()
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def served(tmp_path: Path):
    s = Served(tmp_path / "store.db").start()
    yield s
    s.kill()


@pytest.fixture
def client(served: Served):
    with Client(served.url) as c:
        yield c
