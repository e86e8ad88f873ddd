#!/usr/bin/env python3
"""A stock libzmq peer (pyzmq) for a keyed fog-server.

Connects a DEALER to ENDPOINT with CurveZMQ, authenticating with the key
in CLIENT_KEY (a `fog-server keygen` .secret file) and trusting only the
server key in SERVER_KEY (a .pub file), sends the bytes of REQUEST as one
frame (a request the Rust test encoded with fog_protocol::encode: the
payload is postcard, which this script does not speak), and writes the
reply frame to REPLY.

Exit codes: 0 a reply came (its length and first byte are printed),
3 no reply within the timeout, 2 bad usage or unreadable key files.
Run by e2e/tests/interop.rs.
"""

import argparse
import sys

import zmq


def key_field(path, name):
    """The Z85 text of field `name` in a fog key file (`name = "..."`)."""
    with open(path, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            field, value = (part.strip() for part in line.split("=", 1))
            if field == name:
                value = value.strip('"')
                if len(value) != 40:
                    raise ValueError(f"{path}: {name} is not 40 Z85 characters")
                return value.encode("ascii")
    raise ValueError(f"{path}: no {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--server-key", required=True, help="the server's .pub file")
    parser.add_argument("--client-key", required=True, help="this client's .secret file")
    parser.add_argument("--request", required=True, help="file holding one encoded request frame")
    parser.add_argument("--reply", required=True, help="file the reply frame is written to")
    parser.add_argument("--timeout-ms", type=int, default=5000)
    args = parser.parse_args()

    try:
        server_public = key_field(args.server_key, "public-key")
        client_public = key_field(args.client_key, "public-key")
        client_secret = key_field(args.client_key, "secret-key")
        with open(args.request, "rb") as f:
            request = f.read()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not zmq.has("curve"):
        print("error: this libzmq has no CURVE support", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    socket = ctx.socket(zmq.DEALER)
    socket.linger = 0
    socket.curve_serverkey = server_public
    socket.curve_publickey = client_public
    socket.curve_secretkey = client_secret
    socket.connect(args.endpoint)
    try:
        socket.send(request)
        if not socket.poll(args.timeout_ms, zmq.POLLIN):
            print(f"no reply within {args.timeout_ms} ms (libzmq {zmq.zmq_version()}, pyzmq {zmq.pyzmq_version()})")
            return 3
        frames = socket.recv_multipart()
        reply = frames[-1]
        with open(args.reply, "wb") as f:
            f.write(reply)
        first = f"{reply[0]:#04x}" if reply else "none"
        print(f"reply: {len(reply)} bytes in {len(frames)} frame(s), first byte {first} (libzmq {zmq.zmq_version()}, pyzmq {zmq.pyzmq_version()})")
        return 0
    finally:
        socket.close()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
