"""The HTTP workers of `multiagents bench http --workers none`, in Python:
no-op steps, so that what is measured is the protocol and the loop.

    multiagents bench http --workers none --listen 127.0.0.1:7440 &
    python examples/bench_worker.py --server http://127.0.0.1:7440

A declined order (the same ones as the Rust bench workers decline) fails its
payment for good, so that it compensates.
"""

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiagents_client import Client, WorkerError, run_workers, worker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--fail-rate", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=600)
    args = ap.parse_args()
    cut = round(args.fail_rate * 1000)

    def noop(name):
        @worker(name)
        def step(order, task):
            return {"ok": True}

        return step

    @worker("charge_payment")
    def charge(order, task):
        if order["n"] % 1000 < cut:
            raise WorkerError("card declined", kind="declined", retry="no")
        return {"ok": True}

    names = ["validate_order", "reserve_inventory", "release_inventory", "refund_payment", "create_invoice", "notify_customer"]
    stop = threading.Event()
    threading.Timer(args.seconds, stop.set).start()
    run_workers([*(noop(n) for n in names), charge], Client(args.server), concurrency=args.concurrency, stop=stop, poll_wait=1.0)


if __name__ == "__main__":
    main()
