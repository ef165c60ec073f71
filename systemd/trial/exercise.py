"""Client side of run-trial.sh with SERVER=blobd: talks to the real server
inside the trial over HTTP, standard library only.

    exercise.py put-get TOKEN   store a blob, read it back whole and by range
    exercise.py stall TOKEN     start an upload, send half, then hold it open
"""

import hashlib
import json
import os
import socket
import sys
import time
import urllib.request

URL = "http://127.0.0.1:8420"


def request(method, path, token, data=None, headers=None):
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    req = urllib.request.Request(URL + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


def put_get(token):
    data = os.urandom(300_000)
    status, body = request("POST", "/blobs", token, data)
    stored = json.loads(body)
    print(f"POST /blobs: {status}, sha256 matches: "
          f"{stored['sha256'] == hashlib.sha256(data).hexdigest()}")
    status, body = request("GET", f"/blobs/{stored['hash']}", token)
    print(f"GET whole: {status}, bytes match: {body == data}")
    status, body = request("GET", f"/blobs/{stored['hash']}", token,
                           headers={"Range": "bytes=1000-1999"})
    print(f"GET range: {status}, bytes match: {body == data[1000:2000]}")


def stall(token):
    data = os.urandom(2_000_000)
    sock = socket.create_connection(("127.0.0.1", 8420))
    sock.sendall(f"POST /blobs HTTP/1.1\r\nHost: trial\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:1_000_000])
    print("upload stalled at 1000000 of 2000000 bytes", flush=True)
    sock.settimeout(60)
    started = time.monotonic()
    answer = sock.recv(200)
    print(f"server answered after {time.monotonic() - started:.1f}s: {answer[:40]!r}")


if __name__ == "__main__":
    {"put-get": put_get, "stall": stall}[sys.argv[1]](sys.argv[2])
