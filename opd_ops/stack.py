"""Local dev stack for `make demo` and the tests: a Prefect server and a SeaweedFS S3 gateway.

Framework-free on purpose: Prefect is started as a subprocess (never imported here), so this
module works before Prefect is configured and cannot be affected by the client's settings.

Every process is started detached (its own session / process group), logs to
``<home>/stack/<name>.log`` and has its pid in ``<home>/stack/<name>.pid``.  ``down`` only stops
processes recorded in pid files, so a server that someone else started on the same port is
reused by ``up`` but never killed.

Everything listens on loopback only.  SeaweedFS runs without credentials (open mode), which is
only acceptable because of that; clients sign with throwaway keys.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PREFECT = "prefect"
SEAWEEDFS = "seaweedfs"
SERVICES = (PREFECT, SEAWEEDFS)

# Throwaway keys for the open local SeaweedFS: boto3 refuses to send unsigned requests by default.
LOCAL_S3_KEY = "opd"
LOCAL_S3_SECRET = "opd-local-secret"
LOCAL_S3_REGION = "us-east-1"

# Credentials in weed's environment make `weed mini` create an identity and require auth;
# the local stack deliberately runs open, so these never reach it.
_WEED_ENV_DROP = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "S3_BUCKET", "S3_TABLE_BUCKET")
# A database URL inherited from the caller would move the server off the SQLite file under home.
_PREFECT_ENV_DROP = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                     "PREFECT_PROFILES_PATH", "PREFECT_PROFILE")

_STOP_GRACE_S = 15.0
_POLL_S = 0.5
_LOG_TAIL_LINES = 20


@dataclass
class StackSettings:
    """Where the stack keeps its state and which loopback ports it uses.

    `weed mini` opens eight more ports besides S3 (master, volume, filer, admin and their gRPC
    ports).  They are taken as one consecutive block starting at ``weed_port_base`` (default
    ``s3_port + 1``) so that two stacks with different ``s3_port`` values do not collide.
    """

    home: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    s3_port: int = 8333
    weed_port_base: int | None = None

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        ports = [self.prefect_port, self.s3_port, *self.weed_ports.values()]
        bad = [p for p in ports if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"port(s) out of range: {bad}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"stack ports overlap: prefect={self.prefect_port}, s3={self.s3_port}, "
                             f"weed={self.weed_ports}")

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def weed_ports(self) -> dict[str, int]:
        """`weed mini` flag name -> port, for every listener besides S3 itself."""
        base = self.s3_port + 1 if self.weed_port_base is None else self.weed_port_base
        names = ("master.port", "volume.port", "filer.port", "admin.port",
                 "s3.port.grpc", "master.port.grpc", "volume.port.grpc", "filer.port.grpc",
                 "admin.port.grpc")
        return {name: base + i for i, name in enumerate(names)}


@dataclass(frozen=True)
class _Service:
    name: str
    marker: str                       # must appear in /proc/<pid>/cmdline for the pid to be ours
    url: str
    ports: tuple[int, ...]            # every port the process will listen on
    command: list[str]
    env: dict[str, str]
    healthy: Callable[[], bool]


def stack_env(settings: StackSettings) -> dict[str, str]:
    """Environment variables that point clients (Prefect flows, the S3 registry) at this stack."""
    return {
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_UI_URL": settings.prefect_ui_url,
        "OPD_S3_ENDPOINT": settings.s3_endpoint,
    }


# --------------------------------------------------------------------------- health checks

def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET, or None if nothing answered. Proxies are bypassed: it is loopback."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def _prefect_healthy(settings: StackSettings) -> bool:
    return _http_status(f"{settings.prefect_api_url}/health") == 200


def _s3_healthy(settings: StackSettings) -> bool:
    """Any HTTP answer on the S3 port, then a signed ListBuckets like real clients will send."""
    if _http_status(f"{settings.s3_endpoint}/") is None:
        return False
    try:
        import boto3  # lazy: heavy import, only needed once the port answers
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint, region_name=LOCAL_S3_REGION,
            aws_access_key_id=LOCAL_S3_KEY, aws_secret_access_key=LOCAL_S3_SECRET,
            config=Config(s3={"addressing_style": "path"}, proxies={}, connect_timeout=2,
                          read_timeout=5, retries={"max_attempts": 1}),
        )
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
        return False


# --------------------------------------------------------------------------- services

def _venv_tool(name: str) -> str:
    """The tool installed next to this interpreter (the venv's bin), else whatever PATH has."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"cannot find the {name!r} executable next to {sys.executable} or on PATH")
    return found


def _services(settings: StackSettings) -> list[_Service]:
    sd = settings.stack_dir.resolve()
    base_env = dict(os.environ)

    prefect_env = {k: v for k, v in base_env.items() if k not in _PREFECT_ENV_DROP}
    prefect_env.update(PREFECT_HOME=str(sd / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    prefect = _Service(
        name=PREFECT, marker="prefect", url=settings.prefect_ui_url, ports=(settings.prefect_port,),
        command=[_venv_tool("prefect"), "server", "start",
                 "--host", settings.host, "--port", str(settings.prefect_port)],
        env=prefect_env, healthy=lambda: _prefect_healthy(settings),
    )

    weed_env = {k: v for k, v in base_env.items() if k not in _WEED_ENV_DROP}
    weed = _Service(
        name=SEAWEEDFS, marker="weed", url=settings.s3_endpoint,
        ports=(settings.s3_port, *settings.weed_ports.values()),
        command=[_venv_tool("weed"), *weed_flags(settings)],
        env=weed_env, healthy=lambda: _s3_healthy(settings),
    )
    return [prefect, weed]


def weed_flags(settings: StackSettings) -> list[str]:
    """`weed mini` arguments: loopback-only listeners, every port pinned, extras switched off.

    Every port is pinned because weed's defaults (9333, 9340, 8888, 23646 and their +10000 gRPC
    ports) would collide between two stacks; the admin server cannot be switched off
    (`-admin.ui=false` only hides the UI, `-admin.port=0` picks random ports), so it gets ports
    too.  WebDAV, Iceberg and Lance are not used by the pipeline, so they are not started.
    """
    sd = settings.stack_dir.resolve()
    return [
        "mini",
        f"-dir={sd / 's3data'}",
        f"-ip={settings.host}",
        f"-ip.bind={settings.host}",
        f"-s3.port={settings.s3_port}",
        *(f"-{flag}={port}" for flag, port in settings.weed_ports.items()),
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]


# --------------------------------------------------------------------------- process helpers

def _pid_file(settings: StackSettings, name: str) -> Path:
    return settings.stack_dir / f"{name}.pid"


def _log_file(settings: StackSettings, name: str) -> Path:
    return settings.stack_dir / f"{name}.log"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True for a live, non-zombie process; reaps it first if it is our own exited child."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_ours(pid: int, service: _Service) -> bool:
    """Guard against pid reuse: the live process must still be this service's command."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return service.marker in cmdline and str(service.ports[0]) in cmdline


def _owned_pid(settings: StackSettings, service: _Service) -> int | None:
    pid = _read_pid(_pid_file(settings, service.name))
    return pid if pid is not None and _is_ours(pid, service) else None


def _log_tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _busy_ports(host: str, ports: tuple[int, ...]) -> list[int]:
    """Ports we cannot bind, i.e. something else already listens there."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    busy.append(port)
                else:
                    raise
    return busy


@contextlib.contextmanager
def _locked(settings: StackSettings) -> Iterator[None]:
    """Serialise up/down on one home so two callers never both start a service."""
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.stack_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start(settings: StackSettings, service: _Service) -> int:
    log = _log_file(settings, service.name)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(service.command)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            service.command, env=service.env, cwd=settings.stack_dir, stdin=subprocess.DEVNULL,
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    _pid_file(settings, service.name).write_text(f"{proc.pid}\n")
    return proc.pid


def _remove_weed_sockets(settings: StackSettings) -> None:
    """weed leaves unix sockets named after its ports in the temp dir; tidy the ones of ours."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    for port in (settings.s3_port, *settings.weed_ports.values()):
        for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()


def _signal_group(pid: int, sig: int) -> None:
    """Signal the whole process group (start_new_session made pid its leader), else just pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(pids: list[int]) -> None:
    """SIGTERM, up to 15 s grace, then SIGKILL for whatever is still alive."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)


# --------------------------------------------------------------------------- public API

def up(settings: StackSettings, timeout: float = 120) -> dict:
    """Start whatever is not already running and wait until every service is healthy.

    Idempotent: a healthy process from our pid file is reused ("reused"); a healthy server on
    the port that we did not start is used but not adopted ("external").  Returns, per service,
    ``{"action", "pid", "url", "seconds"}`` where seconds is the time spent waiting for health.
    Raises RuntimeError (with the log tail) if a service does not become healthy in `timeout`.
    """
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    (settings.stack_dir / "prefect").mkdir(exist_ok=True)
    (settings.stack_dir / "s3data").mkdir(exist_ok=True)
    result: dict[str, dict] = {}
    with _locked(settings):
        waiting: list[tuple[_Service, int, str, float]] = []
        to_start: list[_Service] = []
        for service in _services(settings):
            pid = _owned_pid(settings, service)
            if pid is not None:
                # Ours and alive: possibly still starting, so wait for health rather than restart.
                waiting.append((service, pid, "reused", time.monotonic()))
                continue
            _pid_file(settings, service.name).unlink(missing_ok=True)  # stale or recycled pid
            if service.healthy():
                result[service.name] = {"action": "external", "pid": None, "url": service.url, "seconds": 0.0}
            else:
                to_start.append(service)
        # Check every port before starting anything, so a conflict leaves no half-started stack.
        conflicts = [f"{s.name}: {busy}" for s in to_start if (busy := _busy_ports(settings.host, s.ports))]
        if conflicts:
            raise RuntimeError(f"port(s) on {settings.host} already in use by something that is not a "
                               f"healthy stack service ({'; '.join(conflicts)}); free them or choose "
                               f"other ports")
        for service in to_start:
            waiting.append((service, _start(settings, service), "started", time.monotonic()))

        failures = []
        pending = list(waiting)
        while pending:  # poll all together so each service's time-to-healthy is its own
            for item in list(pending):
                service, pid, action, t0 = item
                if service.healthy():
                    result[service.name] = {"action": action, "pid": pid, "url": service.url,
                                            "seconds": round(time.monotonic() - t0, 2)}
                    pending.remove(item)
                    continue
                exited = not _alive(pid)
                if exited or time.monotonic() > t0 + timeout:
                    why = "exited" if exited else f"not healthy after {timeout:g} s"
                    if not exited:
                        _stop([pid])
                    _pid_file(settings, service.name).unlink(missing_ok=True)
                    log = _log_file(settings, service.name)
                    failures.append(f"{service.name} {why}; last lines of {log}:\n{_log_tail(log)}")
                    pending.remove(item)
            if pending:
                time.sleep(_POLL_S)
        if failures:
            raise RuntimeError("\n\n".join(failures))
    return result


def down(settings: StackSettings) -> list[str]:
    """Stop only the processes `up` started (those in pid files); returns their service names."""
    if not settings.stack_dir.exists():
        return []
    with _locked(settings):
        to_stop: list[tuple[str, int]] = []
        for service in _services(settings):
            pid = _owned_pid(settings, service)
            if pid is not None:
                to_stop.append((service.name, pid))
        _stop([pid for _, pid in to_stop])
        for name in SERVICES:
            _pid_file(settings, name).unlink(missing_ok=True)
        if any(name == SEAWEEDFS for name, _ in to_stop):
            _remove_weed_sockets(settings)
    return [name for name, _ in to_stop]


def status(settings: StackSettings) -> dict:
    """Per service: running (our process alive, or something healthy on the port), pid (ours
    only), healthy, url, and managed (True when the process is one `up` started)."""
    out: dict[str, dict] = {}
    for service in _services(settings):
        pid = _owned_pid(settings, service) if settings.stack_dir.exists() else None
        healthy = service.healthy()
        out[service.name] = {"running": pid is not None or healthy, "pid": pid, "healthy": healthy,
                             "url": service.url, "managed": pid is not None}
    return out
