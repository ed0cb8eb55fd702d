#!/usr/bin/env python3
"""The chaos run: the `orders` benchmark on a throw-away Redis while processes die.

Starts a Redis of its own (AOF on, appendfsync everysec) on a free loopback
port, N orchestrators (`multiagents bench orders --role orchestrator`), M
worker processes (`--role workers`) and one client (`--role client`). Every
K seconds it SIGKILLs one orchestrator and one worker process and starts them
again; once, it writes a garbage entry and an oversized entry into every
stream; with --restart-redis it shuts Redis down mid-run and starts it again
on the same files. At the end it prints what the client counted and fails
(exit 1) on any lost, stuck or duplicated work:

    lost 0, stuck 0, duplicate effects 0, compensations == declines

Usage:
    scripts/chaos.py [--orders 20000] [--concurrency 500] [--fail-rate 0.1]
                     [--orchestrators 2] [--workers 2] [--kill-every 3]
                     [--rounds 6] [--restart-redis] [--binary PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PREFIX = "chaos"
STREAMS = [
    "results",
    "commands.validate_order",
    "commands.reserve_inventory",
    "commands.release_inventory",
    "commands.charge_payment",
    "commands.refund_payment",
    "commands.create_invoice",
    "commands.notify_customer",
]


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Redis:
    def __init__(self, work):
        self.port = free_port()
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
            ],
            stdout=open(os.path.join(self.dir, "redis.log"), "ab"),
            stderr=subprocess.STDOUT,
        )
        if not wait_port(self.port):
            raise SystemExit("error: redis-server did not start; see " + self.dir)

    def cli(self, *args, stdin=None):
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            input=stdin, capture_output=True, check=False,
        )

    def restart(self):
        # SHUTDOWN writes the AOF out first; what the bus had acked survives.
        self.cli("SHUTDOWN")
        self.proc.wait(timeout=30)
        self.start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"


def poison(redis):
    big = b"x" * (3 * 1024 * 1024)
    for stream in STREAMS:
        key = "{%s:%s}" % (PREFIX, stream)
        redis.cli("-x", "XADD", key, "*", "e", stdin=b"\x00not an event\xff")
        redis.cli("-x", "XADD", key, "*", "e", stdin=big)
    log(f"wrote a garbage entry and a 3 MB entry into each of {len(STREAMS)} streams")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--fail-rate", type=float, default=0.1)
    ap.add_argument("--orchestrators", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    ap.add_argument("--rounds", type=int, default=6, help="kills of each role")
    ap.add_argument("--no-poison", action="store_true")
    ap.add_argument("--restart-redis", action="store_true",
                    help="shut Redis down and start it again once, mid-run")
    ap.add_argument("--stuck-after", default="60s")
    ap.add_argument("--binary", help="the multiagents binary (default: build it in release)")
    args = ap.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = args.binary
    if not binary:
        log("building multiagents (release)")
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "multiagents-cli"],
                       cwd=root, check=True)
        binary = os.path.join(root, "target", "release", "multiagents")

    work = tempfile.mkdtemp(prefix="multiagents-chaos-")
    redis = Redis(work)
    redis.start()
    log(f"throw-away Redis at {redis.url} (AOF everysec) in {work}")
    common = ["bench", "orders", "--backend", "redis", "--redis-url", redis.url,
              "--prefix", PREFIX, "--fail-rate", str(args.fail_rate)]
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    procs = {}

    def spawn(role, i):
        name = f"{role}-{i}"
        out = open(os.path.join(logs, f"{name}.log"), "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        procs[name] = subprocess.Popen([binary, *common, "--role", role], stdout=out,
                                       stderr=subprocess.STDOUT, env=env)

    for i in range(args.orchestrators):
        spawn("orchestrator", i)
    for i in range(args.workers):
        spawn("workers", i)
    time.sleep(1.0)
    client = subprocess.Popen(
        [binary, *common, "--role", "client", "--workflows", str(args.orders),
         "--concurrency", str(args.concurrency), "--stuck-after", args.stuck_after, "--json"],
        stdout=subprocess.PIPE, stderr=open(os.path.join(logs, "client.log"), "ab"),
    )
    started = time.time()
    kills = 0
    poisoned = args.no_poison
    restarted = not args.restart_redis
    try:
        for round_ in range(args.rounds):
            time.sleep(args.kill_every)
            if client.poll() is not None:
                break
            for role, count in (("orchestrator", args.orchestrators), ("workers", args.workers)):
                name = f"{role}-{round_ % count}"
                procs[name].send_signal(signal.SIGKILL)
                procs[name].wait()
                spawn(role, round_ % count)
                kills += 1
            log(f"round {round_ + 1}/{args.rounds}: SIGKILLed and restarted "
                f"orchestrator-{round_ % args.orchestrators} and workers-{round_ % args.workers}")
            if not poisoned:
                poison(redis)
                poisoned = True
            if not restarted and round_ + 1 >= args.rounds // 2:
                log("shutting Redis down and starting it again")
                redis.restart()
                restarted = True
        out, _ = client.communicate()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if client.poll() is None:
            client.kill()
        dead = redis.cli("XLEN", "{%s:dead-letters}" % PREFIX).stdout.decode().strip()
        redis.stop()

    lines = [l for l in out.decode().splitlines() if l.startswith("{")]
    if not lines:
        log(f"error: the client printed no report; logs in {logs}")
        return 1
    r = json.loads(lines[-1])
    accounted = r["completed"] + r["compensated"] + r["failed"] + r["compensation_failed"] + r["stuck"]
    summary = {
        "orders": args.orders,
        "kills": kills,
        "redis_restarted": bool(args.restart_redis) and restarted,
        "seconds": round(time.time() - started, 2),
        "lost": args.orders - accounted,
        "stuck": r["stuck"],
        "completed": r["completed"],
        "compensated": r["compensated"],
        "failed": r["failed"] + r["compensation_failed"],
        "declined": r["declined"],
        "compensations": r["compensations"],
        "duplicate_effects": r["duplicate_effects"],
        "stale_runs": r["stale_runs"],
        "redelivered_runs": r["redelivered_runs"],
        "dead_letters": int(dead) if dead.isdigit() else None,
        "latency_p50_ms": round(r["latency_p50_ms"], 1),
        "latency_p99_ms": round(r["latency_p99_ms"], 1),
    }
    ok = (summary["lost"] == 0 and summary["stuck"] == 0 and summary["failed"] == 0
          and summary["duplicate_effects"] == 0
          and summary["compensations"] == summary["declined"])
    log("lost {lost}, stuck {stuck}, duplicate effects {duplicate_effects}, stale runs "
        "{stale_runs}, compensations {compensations} / declines {declined}, "
        "p50 {latency_p50_ms} ms, p99 {latency_p99_ms} ms".format(**summary))
    print(json.dumps(summary))
    if ok:
        shutil.rmtree(work, ignore_errors=True)
        return 0
    log(f"error: the run lost, stuck or duplicated work; logs kept in {logs}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
