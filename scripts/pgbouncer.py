"""A PgBouncer in transaction mode in front of the local PostgreSQL, for the tests.

    python scripts/pgbouncer.py up       # install Debian's pgbouncer if missing, start it
    python scripts/pgbouncer.py status   # exit 0 when ours answers
    python scripts/pgbouncer.py stop

``up`` is idempotent: a PgBouncer of ours that answers is left as it is. Its files (the
config, the user list, the pid file, the log, the Unix socket) live in a directory of its
own, ``/tmp/openworkflow-pgbouncer-<port>`` unless ``--dir`` (or ``PGBOUNCER_DIR``) says
otherwise. It listens on 127.0.0.1:6432 (``--port``/``PGBOUNCER_PORT``) and sends every
database name (``*``) to 127.0.0.1:5432 (``--server-port``), in transaction mode, with
``auth_type = trust`` (the local server trusts ``postgres``). PgBouncer refuses to run as
root: as root it is started with ``-u postgres``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """\
; Written by scripts/pgbouncer.py: a pooler in transaction mode for django-openworkflow's tests.
[databases]
* = host={server_host} port={server_port}

[pgbouncer]
listen_addr = {listen_addr}
listen_port = {port}
unix_socket_dir = {dir}
pidfile = {dir}/pgbouncer.pid
logfile = {dir}/pgbouncer.log
pool_mode = transaction
auth_type = trust
auth_file = {dir}/userlist.txt
admin_users = {user}
default_pool_size = {pool_size}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="up", choices=["up", "stop", "status"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PGBOUNCER_PORT", 6432)))
    parser.add_argument("--listen-addr", default="127.0.0.1")
    parser.add_argument("--dir", default=os.environ.get("PGBOUNCER_DIR"))
    parser.add_argument("--server-host", default="127.0.0.1")
    parser.add_argument("--server-port", type=int, default=5432)
    parser.add_argument("--user", default="postgres", help="database user (trusted)")
    parser.add_argument("--pool-size", type=int, default=10, help="server connections per db")
    args = parser.parse_args()
    args.dir = Path(args.dir or f"/tmp/openworkflow-pgbouncer-{args.port}")
    if args.command == "stop":
        return stop(args)
    if args.command == "status":
        up = answers(args) and ours(args) is not None
        print(f"PgBouncer on {args.listen_addr}:{args.port}: {'up' if up else 'down'}")
        return 0 if up else 1
    return start(args)


def start(args: argparse.Namespace) -> int:
    where = f"{args.listen_addr}:{args.port}"
    if ours(args) is not None and answers(args):
        print(f"PgBouncer already up on {where} ({args.dir})")
        return 0
    if listening(args):
        print(
            f"Port {where} is taken by another process than the PgBouncer of {args.dir}: "
            "stop it, or pass --port (PGBOUNCER_PORT)",
            file=sys.stderr,
        )
        return 1
    binary = pgbouncer_binary() or install()
    if binary is None:
        return 1
    write_config(args)
    command = [binary, "-d", str(args.dir / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", args.user]  # pgbouncer refuses to run as root
    (args.dir / "pgbouncer.pid").unlink(missing_ok=True)  # a stale one stops -d
    result = subprocess.run(command, capture_output=True, text=True)
    for _ in range(100):
        if answers(args):
            print(
                f"PgBouncer up on {where}, transaction mode, * -> "
                f"{args.server_host}:{args.server_port} ({args.dir})"
            )
            return 0
        time.sleep(0.1)
    print(f"PgBouncer did not come up on {where}: {result.stderr.strip()}", file=sys.stderr)
    log = args.dir / "pgbouncer.log"
    if log.exists():
        print("\n".join(log.read_text().splitlines()[-20:]), file=sys.stderr)
    return 1


def stop(args: argparse.Namespace) -> int:
    pid = ours(args)
    if pid is None:
        print(f"No PgBouncer of {args.dir} is running")
        return 0
    os.kill(pid, signal.SIGTERM)  # immediate shutdown
    for _ in range(100):
        if not alive(pid):
            print(f"PgBouncer stopped (pid {pid})")
            return 0
        time.sleep(0.1)
    print(f"PgBouncer (pid {pid}) did not stop within 10 s", file=sys.stderr)
    return 1


def pgbouncer_binary() -> str | None:
    candidates = (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def install() -> str | None:
    """Debian's pgbouncer package; the system service it may start is stopped again (the
    tests run a PgBouncer of their own)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("pgbouncer is not installed: apt-get install pgbouncer (as root)", file=sys.stderr)
        return None
    print("Installing Debian's pgbouncer package")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"env": env, "stdout": subprocess.DEVNULL}
    if subprocess.run(["apt-get", "update", "-qq"], **quiet).returncode != 0 or (
        subprocess.run(["apt-get", "install", "-y", "-qq", "pgbouncer"], **quiet).returncode
    ):
        print("apt-get install pgbouncer failed", file=sys.stderr)
        return None
    for command in (["systemctl", "stop", "pgbouncer"], ["service", "pgbouncer", "stop"]):
        with contextlib.suppress(OSError):
            subprocess.run(command, capture_output=True)
    return pgbouncer_binary()


def write_config(args: argparse.Namespace) -> None:
    args.dir.mkdir(parents=True, exist_ok=True)
    (args.dir / "pgbouncer.ini").write_text(CONFIG.format(**vars(args)))
    (args.dir / "userlist.txt").write_text(f'"{args.user}" ""\n')
    if os.geteuid() == 0:  # pgbouncer runs as the user: its pid file, log and socket
        account = pwd.getpwnam(args.user)
        for path in (args.dir, *args.dir.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)


def ours(args: argparse.Namespace) -> int | None:
    """The pid of the PgBouncer of ``args.dir``, if it runs."""
    try:
        pid = int((args.dir / "pgbouncer.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def listening(args: argparse.Namespace) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((args.listen_addr, args.port)) == 0


def answers(args: argparse.Namespace) -> bool:
    """A query through the pooler to the server's ``postgres`` database succeeds."""
    import psycopg

    try:
        with psycopg.connect(
            host=args.listen_addr,
            port=args.port,
            user=args.user,
            dbname="postgres",
            connect_timeout=2,
            autocommit=True,
        ) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
