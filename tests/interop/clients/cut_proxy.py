"""A TCP proxy on loopback that cuts new streams mid-answer, like a flaky
mobile link: the first CUTS requests for a new stream (a GET or POST of
/v1/chat/stream without Last-Event-ID) are reset after CUT_BYTES bytes of
the answer have passed. Everything else passes through. Each request gets
its own connection (the proxy asks sluice for `Connection: close`), so a
reconnect is a new connection and is never cut.

    python cut_proxy.py --upstream HOST:PORT [--cut-bytes 1500] [--cuts 1]

Prints `cut proxy on 127.0.0.1:PORT` once listening, and `cut N` per cut.
"""

import argparse
import socket
import struct
import threading

ap = argparse.ArgumentParser()
ap.add_argument("--upstream", required=True)
ap.add_argument("--cut-bytes", type=int, default=1500)
ap.add_argument("--cuts", type=int, default=1)
args = ap.parse_args()
host, port = args.upstream.rsplit(":", 1)
assert host.startswith("127."), "loopback only"
lock = threading.Lock()
cuts = [0]


def reset(s):
    # Linger 0 makes the close a reset. shutdown() first: another thread
    # may be blocked reading this socket, and a bare close() would wait
    # for it instead of cutting the connection now.
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def pipe(src, dst):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client):
    head = b""
    while b"\r\n\r\n" not in head:
        b = client.recv(65536)
        if not b:
            client.close()
            return
        head += b
    head_part, rest = head.split(b"\r\n\r\n", 1)
    lines = head_part.split(b"\r\n")
    lines = [l for l in lines if not l.lower().startswith(b"connection:")]
    lines.append(b"Connection: close")
    first = lines[0].decode("latin-1")
    new_stream = (first.startswith("GET /v1/chat/stream?") or first.startswith("POST /v1/chat/stream ")) and not any(
        l.lower().startswith(b"last-event-id:") for l in lines
    )
    up = socket.create_connection((host, int(port)))
    up.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
    with lock:
        cut = new_stream and cuts[0] < args.cuts
        if cut:
            cuts[0] += 1
            n = cuts[0]
    if not cut:
        threading.Thread(target=pipe, args=(client, up), daemon=True).start()
        pipe(up, client)
        return
    threading.Thread(target=pipe, args=(client, up), daemon=True).start()
    sent = 0
    try:
        while sent < args.cut_bytes:
            b = up.recv(min(65536, args.cut_bytes - sent))
            if not b:
                break
            client.sendall(b)
            sent += len(b)
    except OSError:
        pass
    print(f"cut {n} after {sent} bytes", flush=True)
    reset(client)
    reset(up)


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(128)
print(f"cut proxy on 127.0.0.1:{srv.getsockname()[1]}", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
