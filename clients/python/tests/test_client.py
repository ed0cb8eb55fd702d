"""The client against a real `multiagents serve`: deploy, start (idempotently),
work the steps with Python workers, read, list, retry, signal, cancel, dead
letters, and the problems the service answers."""

import threading
from contextlib import contextmanager

import pytest

from multiagents_client import ApiError, Client, Unreachable, WorkerError, run_workers, worker

from flows import REFUNDS, Bank, refund_workers


@contextmanager
def working(client: Client, workers, **kwargs):
    stop = threading.Event()
    kwargs.setdefault("poll_wait", 1.0)
    t = threading.Thread(target=run_workers, args=(workers, client), kwargs={"stop": stop, **kwargs}, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=60)
        assert not t.is_alive(), "the worker loop stops when asked"


def test_a_run_is_started_once_per_key_worked_by_python_and_read_back(client):
    assert client.deploy(REFUNDS) == {"name": "refunds", "version": 1}
    assert client.definitions()[0]["name"] == "refunds"
    first = client.start("refunds", {"amount": 5}, idempotency_key="refund-1")
    again = client.start("refunds", {"amount": 5}, idempotency_key="refund-1")
    assert first.id == again.id and not first.existed and again.existed
    bank = Bank()
    with working(client, refund_workers(bank)):
        done = client.wait(first.id, timeout=30)
    assert done.status == "completed"
    assert done.output == {"check": {"checked": 5}, "pay": {"paid": 5}}
    assert bank.calls[f"{first.id}/pay/forward"] == 1
    state = client.get(first.id)
    assert [s["name"] for s in state["steps"]] == ["check", "pay"]
    assert state["history"][0]["event"]["event"] == "started"
    page = client.list(workflow="refunds", status="completed")
    assert [r["id"] for r in page.runs] == [first.id] and page.next is None
    assert [r["id"] for r in client.iter_runs(workflow="refunds")] == [first.id]


def test_a_failed_run_is_retried_with_a_patched_input(client):
    client.deploy(REFUNDS)
    bank = Bank()
    with working(client, refund_workers(bank)):
        failed = client.start("refunds", {"amount": 500}, wait=20)
        assert failed.status == "failed"
        assert failed.failure["step"] == "pay"
        retried = client.retry(failed.id, input_patch={"amount": 50}, wait=20)
    assert retried.status == "completed" and retried.retry_of == failed.id
    # `check` stood and was kept; `pay` ran again with the patched input.
    assert retried.output == {"check": {"checked": 500}, "pay": {"paid": 50}}
    with pytest.raises(ApiError) as e:
        client.retry(failed.id)
    assert e.value.status == 409 and "retried already" in e.value.detail


def test_worker_errors_carry_retry_advice(client):
    client.deploy(REFUNDS)
    attempts = []

    @worker("check_refund")
    def check(refund, task):
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise WorkerError("the ledger is busy", retry="after", retry_after_ms=10)
        return {"checked": refund["amount"], "after": task.attempt}

    @worker("pay_refund")
    def pay(refund, task):
        assert task.output("check")["checked"] == refund["amount"]
        raise RuntimeError("the bank is on fire")

    run = client.start("refunds", {"amount": 3})
    with working(client, [check, pay]):
        done = client.wait(run.id, timeout=30)
    assert attempts == [1, 2]
    # Any other exception is retried under the policy (3 attempts), then fails.
    assert done.status == "failed"
    assert "the bank is on fire" in done.failure["error"]["message"]


CHAIN = """\
name: chain
version: 1
steps:
  - {name: first, worker: first}
  - {name: second, worker: second}
  - {name: third, worker: third}
"""


def test_an_output_the_task_does_not_carry_is_read_from_the_service(client):
    client.deploy(CHAIN)
    seen = {}

    @worker("first")
    def first(_, task):
        return {"n": 1}

    @worker("second")
    def second(_, task):
        return {"n": task.output("first")["n"] + 1}

    @worker("third")
    def third(_, task):
        # The task carries `second` (the step it comes after), not `first`.
        seen["carried"] = sorted(task.steps)
        return {"sum": task.output("first")["n"] + task.output("second")["n"]}

    run = client.start("chain", {})
    with working(client, [first, second, third]):
        done = client.wait(run.id, timeout=30)
    assert done.status == "completed", done
    assert seen["carried"] == ["second"]
    assert done.output["third"] == {"sum": 3}
    assert client.output(run.id, "first") == {"n": 1}
    with pytest.raises(ApiError) as e:
        client.output(run.id, "nope")
    assert e.value.status == 404 and "no step `nope`" in e.value.detail


def test_signals_cancellation_and_the_problems_the_service_answers(client):
    client.deploy("name: approvals\nversion: 1\nsteps:\n  - {name: approval, signal: approve}\n")
    run = client.start("approvals", {})
    client.signal(run.id, "approve", {"by": "ana"})
    assert client.wait(run.id, timeout=10).output == {"approval": {"by": "ana"}}
    waiting = client.start("approvals", {})
    assert client.cancel(waiting.id, "changed my mind")
    assert client.wait(waiting.id, timeout=10).status == "cancelled"
    with pytest.raises(ApiError) as e:
        client.list(status="sideways")
    assert e.value.status == 400 and e.value.field == "query.status"
    with pytest.raises(ApiError) as e:
        client.start("nothing", {})
    assert e.value.status == 404
    with pytest.raises(Unreachable) as u:
        Client("http://127.0.0.1:9").me()
    assert "127.0.0.1:9" in str(u.value)


BOOKING = """\
name: booking
version: 1
steps:
  - name: reserve
    worker: reserve_room
    compensation: release_room
  - name: charge
    worker: charge_card
"""


def test_a_failed_compensation_is_redriven_from_the_dead_letters(client):
    client.deploy(BOOKING)
    hotel_up = threading.Event()

    @worker("reserve_room")
    def reserve(booking, task):
        return {"room": 12}

    @worker("charge_card")
    def charge(booking, task):
        raise WorkerError("card declined", kind="declined", retry="no")

    @worker("release_room")
    def release(booking, task):
        if not hotel_up.is_set():
            raise WorkerError("the hotel API is down", retry="no")
        return {"released": 12}

    with working(client, [reserve, charge, release]):
        run = client.start("booking", {"guest": "ana"}, wait=20)
        assert run.status == "compensation_failed"
        letters = [d for d in client.dead_letters() if d["topic"] == "compensations"]
        assert len(letters) == 1 and letters[0]["origin"]["transaction_id"] == run.id
        hotel_up.set()
        assert client.redrive_all(topic="compensations", dry_run=True)["matched"] == 1
        client.redrive(letters[0]["id"])
        assert client.wait(run.id, timeout=20).status == "compensated"
    assert client.dead_letter_audit()[0]["settlement"]["action"] == "redriven"
    with pytest.raises(ApiError) as e:
        client.dead_letter(letters[0]["id"])
    assert e.value.status == 404
