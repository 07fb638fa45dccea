"""Run a program on local processes with ``torchrun --standalone`` (``python -m torch.distributed.run``).

``torch.distributed.run`` picks a free port itself (``--standalone``: a c10d rendezvous on
localhost:0), so concurrent test runs cannot collide on a port, and the workers see the same
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) a user's ``torchrun`` gives them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Launch:
    """A ``torchrun --standalone --nproc_per_node=N`` run in the background; :meth:`wait` collects it."""

    def __init__(self, args: list[str], nproc: int = 2, timeout: float = 600):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")  # the CI machine has 2 cores for 2 ranks
        if sys.platform == "linux" and os.path.exists("/sys/class/net/lo"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, whatever the hostname resolves to
        self.command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ]
        self.timeout = timeout
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def wait(self) -> str:
        """The run's output; raises with it if a rank failed or the run timed out."""
        try:
            output, _ = self.process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the agent and its workers: a session of their own
            output, _ = self.process.communicate()
            raise AssertionError(f"{' '.join(self.command)} timed out after {self.timeout} s:\n{output[-20000:]}")
        if self.process.returncode:
            raise AssertionError(f"{' '.join(self.command)} exited {self.process.returncode}:\n{output[-20000:]}")
        return output


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> str:
    return Launch(args, nproc, timeout).wait()
