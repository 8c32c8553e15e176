"""A real nginx as the caching proxy in front of a node's HLS port, with the
shipped origin config (deploy/nginx/hls-origin.conf): for the CDN test and
the HLS bench."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from relay.testing.loadgen import free_port

SITE = Path(__file__).resolve().parents[2] / "deploy/nginx/hls-origin.conf"


def start_nginx(workdir: Path, upstream: tuple[str, int]) -> tuple[subprocess.Popen, tuple[str, int]]:
    """nginx proxying to `upstream` with its files under `workdir`; returns
    the process and the address it listens on. Raises FileNotFoundError
    without nginx, RuntimeError if it does not start."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    listen = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    site = SITE.read_text().replace("@CACHE_DIR@", str(workdir / "cache")).replace(
        "@RELAY_HLS@", f"{upstream[0]}:{upstream[1]}").replace("@LISTEN@", f"{listen[0]}:{listen[1]}")
    (workdir / "site.conf").write_text(site)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / d).mkdir(exist_ok=True)
    (workdir / "nginx.conf").write_text(f"""
daemon off;
user root;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/site.conf;
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(listen, timeout=1).close()
            return proc, listen
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr is not None else ""
                raise RuntimeError(f"nginx exited: {err}") from None
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start")
