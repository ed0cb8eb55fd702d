"""A client for the multiagents service, and workers as plain functions.

    from multiagents_client import Client

    client = Client("http://127.0.0.1:7430")
    run = client.start("orders", {"id": 7}, idempotency_key="order-7", wait=30)
    print(run.status, run.output)

See README.md.
"""

from .client import DEFAULT_SERVER, TERMINAL, ApiError, Client, Page, Run, Unreachable
from .worker import Task, Worker, WorkerError, run_workers, worker

__all__ = [
    "DEFAULT_SERVER",
    "TERMINAL",
    "ApiError",
    "Client",
    "Page",
    "Run",
    "Task",
    "Unreachable",
    "Worker",
    "WorkerError",
    "run_workers",
    "worker",
]

__version__ = "0.1.0"
