#!/usr/bin/python3
"""A mock IMDS on 169.254.169.254:80 and [fd00:ec2::254]:80 inside the lab VM (which has no
network device): the instance id on GET, a token on PUT /latest/api/token."""
import http.server
import socket
import threading

INSTANCE_ID = b"i-0123456789abcdef0"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = INSTANCE_ID if self.path.endswith("/instance-id") else b"lab"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        body = b"lab-token"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


servers = [
    http.server.ThreadingHTTPServer(("169.254.169.254", 80), Handler),
    Server6(("fd00:ec2::254", 80), Handler),
]
for server in servers[1:]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
servers[0].serve_forever()
