"""Definitions and workers the tests share."""

import threading
from collections import Counter
from typing import Dict

from multiagents_client import WorkerError, worker

REFUNDS = """\
name: refunds
version: 1
steps:
  - name: check
    worker: check_refund
  - name: pay
    worker: pay_refund
"""


class Bank:
    """A payment API that, like Stripe, applies a request once per
    idempotency key and answers a repeat with the first answer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: Dict[str, dict] = {}
        self.calls: Counter = Counter()

    def pay(self, key: str, amount: int) -> dict:
        with self.lock:
            self.calls[key] += 1
            if key not in self.applied:
                self.applied[key] = {"paid": amount}
            return self.applied[key]


def refund_workers(bank: Bank, limit: int = 100):
    @worker("check_refund")
    def check(refund, task):
        return {"checked": refund["amount"]}

    @worker("pay_refund")
    def pay(refund, task):
        if refund["amount"] > limit:
            raise WorkerError("too much", kind="declined", retry="no")
        return bank.pay(task.idempotency_key, refund["amount"])

    return [check, pay]
