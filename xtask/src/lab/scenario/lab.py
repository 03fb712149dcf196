#!/usr/bin/python3
"""The scenario's probes and checks, run inside the lab VM.

  lab.py probe ADDR            connect to ADDR:80 and GET the instance id; prints `ok ID` or
                               `errno NAME` (EPERM when imds-guard denies)
  lab.py probe-v2 ADDR         the same with IMDSv2: a token first, then the GET with it
  lab.py prober ADDR SECONDS EXPECT OUT
                               probes every 20 ms for SECONDS, writes `total wrong` to OUT:
                               how many outcomes were not EXPECT (`ok` or `EPERM`)
  lab.py flood ADDR N          N probes in a row from this one process; prints each distinct
                               outcome with how many times it came (`errno EPERM x20`)
  lab.py events [KEY=VALUE ...]
                               the agent's events in the journal whose fields match (a value
                               `*` matches anything present); prints them, fails if none
  lab.py keep-rules POLICY KEEP...
                               drops the rules `report --suggest-policy` added whose comments
                               mention none of KEEP (an operator's review), printing the rest
"""
import errno
import json
import socket
import subprocess
import sys
import time


def request(addr, head):
    """Sends HEAD (an HTTP/1.0 request's lines) to ADDR:80; returns the response's body."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect((addr, 80))
        sock.sendall(head + b"\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply.split(b"\r\n\r\n", 1)[-1].decode()
    finally:
        sock.close()


def outcome(ask):
    try:
        return "ok " + ask()
    except OSError as err:
        return "errno " + (errno.errorcode.get(err.errno, str(err.errno)) if err.errno else str(err))


def probe(addr):
    return outcome(lambda: request(addr, b"GET /latest/meta-data/instance-id HTTP/1.0\r\n"))


def probe_v2(addr):
    def ask():
        token = request(addr, b"PUT /latest/api/token HTTP/1.0\r\n"
                              b"X-aws-ec2-metadata-token-ttl-seconds: 60\r\n")
        return request(addr, b"GET /latest/meta-data/instance-id HTTP/1.0\r\n"
                             b"X-aws-ec2-metadata-token: " + token.encode() + b"\r\n")
    return outcome(ask)


def events(filters):
    out = subprocess.run(
        ["journalctl", "-u", "imds-guard", "-o", "cat", "--no-pager", "-b", "all"],
        capture_output=True, text=True, check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if all(match(event, key, value) for key, value in filters):
            found.append(event)
    return found


def match(event, key, value):
    node = event
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return value == "*" and node is not None or str(node).lower() == value.lower()


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "probe":
        print(probe(args[0]))
    elif command == "probe-v2":
        print(probe_v2(args[0]))
    elif command == "prober":
        addr, seconds, expect, out = args[0], float(args[1]), args[2], args[3]
        total = wrong = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            outcome = probe(addr)
            total += 1
            if not (outcome.startswith("ok ") if expect == "ok" else outcome == "errno " + expect):
                wrong += 1
                print(outcome, file=sys.stderr)
            time.sleep(0.02)
        with open(out, "w") as f:
            f.write(f"{total} {wrong}\n")
    elif command == "flood":
        addr, count = args[0], int(args[1])
        seen = {}
        for _ in range(count):
            got = probe(addr)
            seen[got] = seen.get(got, 0) + 1
        for got, times in seen.items():
            print(f"{got} x{times}")
    elif command == "events":
        found = events([arg.split("=", 1) for arg in args])
        for event in found:
            print(json.dumps(event))
        sys.exit(0 if found else 1)
    elif command == "keep-rules":
        text = open(args[0]).read()
        keep = args[1:]
        # Tables are separated by blank lines; a suggested rule's comments precede its table.
        blocks = text.split("\n\n")
        suggested = lambda b: "[[allow]]" in b and "# seen:" in b
        kept = [b for b in blocks if not suggested(b) or any(k in b for k in keep)]
        print("\n\n".join(kept))
    else:
        sys.exit(f"unknown command {command}")


main()
