"""Kill -9 of `serve` while Python workers hold leased tasks: after a restart
every run finishes, and no payment is applied twice under one key."""

import threading
import time

from multiagents_client import Client, run_workers, worker

from conftest import Served
from flows import REFUNDS, Bank

RUNS = 20


def test_runs_finish_after_serve_is_killed_twice_while_python_workers_hold_tasks(tmp_path):
    served = Served(tmp_path / "store.db", ["--task-lease", "2s"]).start()
    client = Client(served.url)
    bank = Bank()
    holding = threading.Event()

    @worker("check_refund")
    def check(refund, task):
        return {"checked": refund["amount"]}

    @worker("pay_refund")
    def pay(refund, task):
        holding.set()
        time.sleep(0.3)  # long enough to be killed while holding the task
        return bank.pay(task.idempotency_key, refund["amount"])

    stop = threading.Event()
    loop = threading.Thread(
        target=run_workers, args=([check, pay], client), kwargs={"stop": stop, "concurrency": 4, "poll_wait": 1.0}, daemon=True
    )
    try:
        client.deploy(REFUNDS)
        ids = [client.start("refunds", {"amount": n}, idempotency_key=f"r-{n}").id for n in range(RUNS)]
        loop.start()
        for _ in range(2):
            assert holding.wait(30), "a worker took a task"
            holding.clear()
            served.kill()
            time.sleep(0.5)
            served.start()
        outcomes = {i: client.wait(i, timeout=60).status for i in ids}
        assert set(outcomes.values()) == {"completed"}, outcomes
        for i, n in zip(ids, range(RUNS)):
            key = f"{i}/pay/forward"
            assert bank.applied[key] == {"paid": n}
        assert len(bank.applied) == RUNS
        # The tasks held when serve died were given again, and the bank
        # applied each payment once all the same.
        assert max(bank.calls.values()) >= 2, bank.calls
    finally:
        stop.set()
        loop.join(timeout=60)
        served.kill()
        client.close()


def test_a_long_call_keeps_its_task_with_heartbeats(tmp_path):
    served = Served(tmp_path / "store.db", ["--task-lease", "1s"]).start()
    client = Client(served.url)
    calls = []

    @worker("check_refund")
    def check(refund, task):
        calls.append((task.attempt, task.delivery_count))
        time.sleep(4)  # beyond the lease and the bus visibility: kept by heartbeats
        return {"checked": refund["amount"]}

    @worker("pay_refund")
    def pay(refund, task):
        return {"paid": refund["amount"]}

    stop = threading.Event()
    loop = threading.Thread(
        target=run_workers, args=([check, pay], client), kwargs={"stop": stop, "concurrency": 2, "poll_wait": 1.0}, daemon=True
    )
    try:
        client.deploy(REFUNDS)
        run = client.start("refunds", {"amount": 9})
        loop.start()
        assert client.wait(run.id, timeout=30).status == "completed"
        assert calls == [(1, 1)], "the task was never given to another worker"
    finally:
        stop.set()
        loop.join(timeout=60)
        served.kill()
        client.close()
