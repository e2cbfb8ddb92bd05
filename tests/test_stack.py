"""The local stack really starts, is reused, stays on loopback, serves S3, and goes away cleanly.

Uses non-default ports so it can run next to a developer's `make demo` stack.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_ops import stack
from opd_ops.stack import StackSettings

PREFECT_PORT = 4290
S3_PORT = 8390


def _session_pids(leader: int) -> set[int]:
    """The leader plus every process in its session (start_new_session made it the leader)."""
    pids = {leader}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader:  # field 6 of stat = session id
                pids.add(int(entry.name))
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _decode_addr(hex_addr: str) -> tuple[str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    port = int(port_hex, 16)
    if len(ip_hex) == 8:
        ip = ".".join(str(b) for b in bytes.fromhex(ip_hex)[::-1])
    else:  # IPv6: four little-endian 32-bit words
        words = [bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, 32, 8)]
        raw = b"".join(words)
        ip = ":".join(raw[i:i + 2].hex() for i in range(0, 16, 2))
    return ip, port


def _listeners(leader: int) -> list[tuple[str, str, int]]:
    """(proto, ip, port) of every listening TCP socket and bound UDP socket of the session."""
    inodes: set[str] = set()
    for pid in _session_pids(leader):
        inodes |= _socket_inodes(pid)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode not in inodes:
                continue
            if proto.startswith("tcp") and state != "0A":  # 0A = LISTEN
                continue
            ip, port = _decode_addr(local)
            found.append((proto, ip, port))
    return found


def _s3_client(settings: StackSettings):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=settings.s3_endpoint, region_name="us-east-1",
        aws_access_key_id="opd", aws_secret_access_key="opd-local-secret",
        config=Config(s3={"addressing_style": "path"}, proxies={}),
    )


def test_settings_derive_urls_and_distinct_ports(tmp_path: Path) -> None:
    s = StackSettings(home=tmp_path, prefect_port=PREFECT_PORT, s3_port=S3_PORT)
    assert s.prefect_api_url == f"http://127.0.0.1:{PREFECT_PORT}/api"
    assert s.prefect_ui_url == f"http://127.0.0.1:{PREFECT_PORT}"
    assert s.s3_endpoint == f"http://127.0.0.1:{S3_PORT}"
    assert stack.stack_env(s) == {"PREFECT_API_URL": s.prefect_api_url, "PREFECT_UI_URL": s.prefect_ui_url,
                                  "OPD_S3_ENDPOINT": s.s3_endpoint}
    default = StackSettings(home=tmp_path)
    assert not set(default.weed_ports.values()) & set(s.weed_ports.values())
    with pytest.raises(ValueError):
        StackSettings(home=tmp_path, prefect_port=8334, s3_port=8333)  # collides with the weed block


def test_up_reuse_loopback_roundtrip_down(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path / ".opd", prefect_port=PREFECT_PORT, s3_port=S3_PORT)
    assert stack.down(settings) == []  # nothing to stop yet; must not touch anything foreign
    try:
        first = stack.up(settings, timeout=120)
        assert {v["action"] for v in first.values()} == {"started"}, first
        st = stack.status(settings)
        for name in stack.SERVICES:
            assert st[name]["running"] and st[name]["healthy"] and st[name]["managed"], st
            assert st[name]["pid"] == first[name]["pid"]
            assert (settings.stack_dir / f"{name}.pid").is_file()
            assert (settings.stack_dir / f"{name}.log").is_file()
        assert (settings.stack_dir / "prefect" / "prefect.db").is_file()  # SQLite under home

        second = stack.up(settings, timeout=30)
        for name in stack.SERVICES:
            assert second[name]["action"] == "reused"
            assert second[name]["pid"] == first[name]["pid"]

        expected_ports = {
            stack.PREFECT: {PREFECT_PORT},
            stack.SEAWEEDFS: {S3_PORT, *settings.weed_ports.values()},
        }
        for name in stack.SERVICES:
            listeners = _listeners(first[name]["pid"])
            assert listeners, name
            not_loopback = [x for x in listeners if x[1] != "127.0.0.1"]
            assert not not_loopback, f"{name} listens beyond loopback: {not_loopback}"
            tcp_ports = {port for proto, _, port in listeners if proto == "tcp"}
            assert expected_ports[name] <= tcp_ports, (name, sorted(tcp_ports))
            if name == stack.SEAWEEDFS:  # every weed port is one we chose, so stacks cannot collide
                assert tcp_ports == expected_ports[name], sorted(tcp_ports)

        s3 = _s3_client(settings)
        s3.create_bucket(Bucket="opd-stack-test")
        s3.put_object(Bucket="opd-stack-test", Key="dir/hello.txt", Body=b"hello seaweed")
        assert s3.get_object(Bucket="opd-stack-test", Key="dir/hello.txt")["Body"].read() == b"hello seaweed"
    finally:
        stopped = stack.down(settings)

    assert sorted(stopped) == sorted(stack.SERVICES)
    for name in stack.SERVICES:
        assert not stack._alive(first[name]["pid"]), name
        assert not (settings.stack_dir / f"{name}.pid").exists()
    st = stack.status(settings)
    for name in stack.SERVICES:
        assert (st[name]["running"], st[name]["healthy"], st[name]["pid"]) == (False, False, None), st
    assert stack.down(settings) == []
