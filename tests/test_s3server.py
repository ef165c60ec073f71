"""The SeaweedFS test server helper itself: ports, addresses, failures, restarts."""

import base64
import json
import re
import socket
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from s3server import (DISABLED_PORT_OPTIONS, PORT_OPTIONS, STOP_TIMEOUT, SeaweedS3,
                      find_weed)


def weed_mini_port_options() -> dict[str, str | None]:
    """Every `-…port…` option of `weed mini -h`, with its printed default."""
    text = subprocess.run(
        [find_weed(), "mini", "-h"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ).stdout
    options: dict[str, str | None] = {}
    for match in re.finditer(r"^  -(\S+) int\n\s+(.*)$", text, re.MULTILINE):
        name, description = match.groups()
        if "port" in name.lower():
            default = re.search(r"\(default:? ([^)]*)\)", description)
            options[name] = default.group(1) if default else None
    return options


def test_every_port_with_a_default_is_given_a_free_one():
    options = weed_mini_port_options()
    assert "s3.port" in options, "could not read `weed mini -h`"
    ours = set(PORT_OPTIONS) | set(DISABLED_PORT_OPTIONS)
    # Options without a printed default default to 0, which keeps them off.
    fixed = {name for name, default in options.items() if default is not None}
    assert fixed <= ours, f"weed mini has port options we leave at their default: {fixed - ours}"
    assert ours <= set(options), f"options weed mini no longer has: {ours - set(options)}"


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = fd.readlink() if fd.is_symlink() else Path()
        found = re.fullmatch(r"socket:\[(\d+)\]", str(target))
        if found:
            inodes.add(found.group(1))
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                address, port = local.split(":")
                listening.add((_decode_address(address), int(port, 16)))
    return listening


def _decode_address(hex_address: str) -> str:
    if len(hex_address) == 8:  # IPv4, little-endian
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_address)[::-1])
    return "ipv6:" + hex_address


def test_listens_on_loopback_on_its_own_ports_only(s3server):
    listening = listening_sockets(s3server.pid)

    assert ("127.0.0.1", s3server.ports["s3.port"]) in listening
    assert {address for address, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(s3server.ports.values())


def test_failed_start_shows_the_log_and_data_survives_a_kill(tmp_path):
    server = SeaweedS3(tmp_path / "weed")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", server.ports["s3.port"]))
    blocker.listen()
    try:
        with pytest.raises(RuntimeError) as caught:
            server.start()
        assert "weed.log" in str(caught.value)
        assert str(server.ports["s3.port"]) in str(caught.value)
        assert not server.running
    finally:
        blocker.close()

    server.start()
    try:
        client = server.client()
        client.put_object(Bucket=server.bucket, Key="survivor", Body=b"still here")
        server.kill()
        assert not server.running
        server.start()
        assert client.get_object(Bucket=server.bucket, Key="survivor")["Body"].read() == b"still here"
    finally:
        server.stop()
    assert not server.running


def _as_if_the_master_had_replayed_its_log(server: SeaweedS3) -> None:
    """Write the highest volume id on disk into the master's raft snapshot,
    as a restarted master that elects itself before it looks at its
    topology knows it from its log: that master waits out a warm-up."""
    (snapshot,) = server.data_dir.glob("m*/snapshot/*.ss")  # weed's format:
    body = json.loads(snapshot.read_bytes().split(b"\n", 1)[1])  # crc32, JSON
    state = json.loads(base64.b64decode(body["state"]))
    state["maxVolumeId"] = max(server._volumes_on_disk())
    body["state"] = base64.b64encode(json.dumps(state).encode()).decode()
    raw = json.dumps(body).encode()
    snapshot.write_bytes(b"%08x\n" % zlib.crc32(raw) + raw)


def test_a_restart_takes_writes_at_once_and_a_hung_stop_is_cut_short(tmp_path):
    """Found measuring the suite: a restarted weed refused writes for its
    master's 15 s warm-up when its raft election won a race (S3 PUTs hung
    19 s, silently), and a stop hung for 30 s (killed at 4) when weed's HTTP
    client had left a connection to the volume server without a request."""
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        client = server.client()
        client.put_object(Bucket=server.bucket, Key="before", Body=b"b" * 100_000)
        idle = socket.create_connection(("127.0.0.1", server.ports["volume.port"]))
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < STOP_TIMEOUT - 1
        assert "volume server still stopping" in server.log_tail(3)
        idle.close()

        _as_if_the_master_had_replayed_its_log(server)
        server.start()
        started = time.monotonic()
        client.put_object(Bucket=server.bucket, Key="after", Body=b"a" * 100_000)
        assert time.monotonic() - started < 5
        assert client.get_object(Bucket=server.bucket, Key="before")["Body"].read() \
            == b"b" * 100_000
    finally:
        server.stop()
