"""Start the other servers of a deployment on this machine, as child processes, and watch them.

Rendezvous is a file in a private temporary directory (file:// init method: no port is chosen or fixed). Each child
checks and loads its own bundle, writes a ready file, then joins the process group; the home waits for every ready
file (or names the child that exited, with its error line) before joining itself.

Several machines: one process per server under torchrun, see moecompress/runtime/edge/commands.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moecompress.errors import MoecompressError


class LocalServers:
    def __init__(self, out: str | Path, world_size: int, home: int, timeout: float, dtype: str = "float32",
                 homes: tuple[int, ...] = (), expert_budget: int | None = None):
        self.out, self.world_size, self.home, self.timeout = str(out), world_size, home, timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="moecompress-edge-"))
        self.init_method = f"file://{self.tmp / 'rendezvous'}"
        self.procs: dict[int, subprocess.Popen] = {}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for rank in range(world_size):
            if rank == home:
                continue
            log = open(self.tmp / f"server-{rank}.log", "w")
            self.procs[rank] = subprocess.Popen(
                [sys.executable, "-m", "moecompress.runtime.edge.serve", "--bundles", self.out, "--rank", str(rank),
                 "--world-size", str(world_size), "--init-method", self.init_method, "--timeout", str(timeout),
                 "--dtype", dtype, "--ready", str(self.tmp / f"ready-{rank}")]
                + (["--homes", ",".join(map(str, homes))] if len(homes) > 1 else [])
                + (["--expert-budget", str(expert_budget)] if expert_budget is not None else []),
                stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()

    def wait_ready(self, load_timeout: float) -> None:
        """Until every child has loaded its bundle; a child that exits first is named with its error line."""
        deadline = time.monotonic() + load_timeout
        waiting = set(self.procs)
        while waiting:
            for rank in sorted(waiting):
                why = self.watch(rank)
                if why is not None:
                    self.close()
                    raise MoecompressError(f"server {rank} {why}")
                if (self.tmp / f"ready-{rank}").exists():
                    waiting.discard(rank)
            if waiting and time.monotonic() > deadline:
                self.close()
                raise MoecompressError(f"servers {sorted(waiting)} did not load their bundles within "
                                       f"{load_timeout:g} s")
            time.sleep(0.05)

    def watch(self, rank: int) -> str | None:
        """Why `rank` is gone (its exit code and last error line), or None while it runs."""
        proc = self.procs.get(rank)
        if proc is None or proc.poll() is None:
            return None
        return f"exited with code {proc.returncode}" + (f": {self.last_line(rank)}" if self.last_line(rank) else "")

    def last_line(self, rank: int) -> str:
        path = self.tmp / f"server-{rank}.log"
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or [""])[-1]

    def close(self, grace: float | None = None) -> None:
        """Wait for the children to stop (they do on a stop message or a lost home), then kill any left."""
        deadline = time.monotonic() + (self.timeout if grace is None else grace)
        for rank, proc in self.procs.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
