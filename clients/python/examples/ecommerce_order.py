"""E-commerce orders with Python workers against `multiagents serve`.

    cargo run -p multiagents-cli -- serve          # in one terminal
    python examples/ecommerce_order.py             # in another

Deploys examples/orders.yaml, runs its workers in this process, and places
five orders: four go through; the one paid with a declined card is
compensated (its reserved stock is released). Prints each outcome.
Set MULTIAGENTS_SERVER (and MULTIAGENTS_API_KEY) for another service.
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiagents_client import Client, WorkerError, run_workers, worker  # noqa: E402

STOCK = {"book": 10, "lamp": 2}
lock = threading.Lock()
payments = {}  # idempotency key -> charge: a payment API applies each once


@worker("validate_order")
def validate(order, task):
    if not order.get("items"):
        raise WorkerError("an order needs items", kind="invalid_input", retry="no")
    return {"valid": True, "total": sum(i["price"] * i["qty"] for i in order["items"])}


@worker("reserve_inventory")
def reserve(order, task):
    with lock:
        for item in order["items"]:
            if STOCK.get(item["sku"], 0) < item["qty"]:
                raise WorkerError(f"out of {item['sku']}", kind="out_of_stock", retry="no")
        for item in order["items"]:
            STOCK[item["sku"]] -= item["qty"]
    return {"reserved": [i["sku"] for i in order["items"]]}


@worker("release_inventory")
def release(order, task):
    with lock:
        for item in order["items"]:
            STOCK[item["sku"]] += item["qty"]
    return {"released": [i["sku"] for i in order["items"]]}


@worker("process_payment")
def pay(order, task):
    if order["card"] == "declined":
        raise WorkerError("card declined", kind="declined", retry="no")
    total = task.output("validate")["total"]
    with lock:
        charge = payments.setdefault(task.idempotency_key, {"charged": total, "card": order["card"][-4:]})
    return charge


@worker("refund_payment")
def refund(order, task):
    return {"refunded": True}


@worker("fulfill_order")
def fulfil(order, task):
    return {"tracking": f"TRK-{task.transaction_id[:8]}"}


@worker("notify_customer")
def notify(order, task):
    return {"emailed": order["email"]}


def main() -> int:
    client = Client()
    client.deploy((Path(__file__).parent / "orders.yaml").read_text())
    stop = threading.Event()
    loop = threading.Thread(
        target=run_workers,
        args=([validate, reserve, release, pay, refund, fulfil, notify], client),
        kwargs={"stop": stop, "poll_wait": 1.0},
        daemon=True,
    )
    loop.start()
    orders = [
        {"id": n, "email": f"buyer{n}@example.com", "card": "4242424242424242",
         "items": [{"sku": "book", "qty": 1, "price": 12}]}
        for n in range(1, 5)
    ]
    orders.append({"id": 5, "email": "buyer5@example.com", "card": "declined",
                   "items": [{"sku": "lamp", "qty": 2, "price": 40}]})
    outcomes = {}
    for order in orders:
        run = client.start("orders", order, idempotency_key=f"order-{order['id']}")
        outcomes[order["id"]] = client.wait(run.id, timeout=60)
    stop.set()
    loop.join(timeout=30)
    for order_id, run in outcomes.items():
        why = f" ({run.failure['error']['message']})" if run.failure else ""
        print(f"order {order_id}: {run.status}{why}")
    print(f"stock left: {STOCK}")
    ok = [r.status for r in outcomes.values()] == ["completed"] * 4 + ["compensated"]
    return 0 if ok and STOCK == {"book": 6, "lamp": 2} else 1


if __name__ == "__main__":
    sys.exit(main())
