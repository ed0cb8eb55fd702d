"""Workers as plain functions, run by a loop that polls the service.

    from multiagents_client import Client, worker, run_workers, WorkerError

    @worker("charge_payment")
    def charge(order, task):
        if order["card"] == "declined":
            raise WorkerError("card declined", kind="declined", retry="no")
        return {"charged": order["amount"], "key": task.idempotency_key}

    run_workers([charge], Client())

A function takes the step's input and the :class:`Task` (ids, attempt,
idempotency key, the earlier steps' outputs) and returns the output (any
JSON value). Raising :class:`WorkerError` says whether to retry; any other
exception is retried under the step's policy. ``async def`` functions work
too. Long calls are kept with heartbeats; answers go back in batches.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from .client import ApiError, Client, Unreachable

log = logging.getLogger("multiagents_client.worker")


class WorkerError(Exception):
    """A step failed: ``retry`` is ``"yes"`` (retry under the step's policy),
    ``"no"`` (fail for good: the workflow compensates) or ``"after"`` (retry
    after ``retry_after_ms``). ``kind`` labels the failure in metrics."""

    def __init__(
        self,
        message: str,
        *,
        kind: Optional[str] = None,
        retry: str = "yes",
        retry_after_ms: Optional[int] = None,
    ):
        if retry not in ("yes", "no", "after"):
            raise ValueError(f"retry must be yes, no or after, not {retry!r}")
        if retry == "after" and retry_after_ms is None:
            raise ValueError("retry='after' needs retry_after_ms")
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.retry = retry
        self.retry_after_ms = retry_after_ms


@dataclass
class Task:
    """One leased task: a step (or its compensation) to do."""

    token: str
    worker: str
    workflow: str
    transaction_id: str
    step: str
    phase: str
    attempt: int
    idempotency_key: str
    attempt_key: str
    deadline: int
    lease_ms: int
    input: Any
    steps: Dict[str, Any] = field(default_factory=dict)
    delivery_count: int = 1
    client: Optional[Any] = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, t: Mapping[str, Any], client: Optional[Any] = None) -> "Task":
        return cls(
            token=t["token"],
            worker=t["worker"],
            workflow=t["workflow"],
            transaction_id=t["transaction_id"],
            step=t["step"],
            phase=t["phase"],
            attempt=t["attempt"],
            idempotency_key=t["idempotency_key"],
            attempt_key=t.get("attempt_key", ""),
            deadline=t["deadline"],
            lease_ms=t["lease_ms"],
            input=t.get("input"),
            steps=t.get("steps") or {},
            delivery_count=t.get("delivery_count", 1),
            client=client,
        )

    def output(self, step: str) -> Any:
        """The output of an earlier step.

        A task carries the outputs of the steps its step comes after (and of
        its ``input_from`` step, and its own when undoing it); any other is
        read from the service (``GET /v1/runs/{id}/outputs/{step}``)."""
        if step in self.steps:
            return self.steps[step]
        if self.client is None:
            return None
        value = self.client.output(self.transaction_id, step)
        self.steps[step] = value
        return value


@dataclass
class Worker:
    """A function registered under a worker type's name."""

    name: str
    function: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def run(self, task: Task) -> Any:
        result = self.function(task.input, task)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def worker(name: str) -> Callable[[Callable[..., Any]], Worker]:
    """Registers a function as the worker type ``name``."""

    def wrap(function: Callable[..., Any]) -> Worker:
        return Worker(name=name, function=function)

    return wrap


class _Answers:
    """Finished tasks' answers, sent in batches by one thread."""

    def __init__(self, client: Client, stop: threading.Event):
        self.client = client
        self.stop = stop
        self.queue: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="multiagents-answers", daemon=True)
        self.thread.start()

    def put(self, answer: Dict[str, Any]) -> None:
        self.queue.put(answer)

    def _run(self) -> None:
        pause = 0.05
        while True:
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < 500:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            while True:
                try:
                    body = self.client.request("POST", "/v1/tasks/answers", json={"answers": batch}).json()
                    pause = 0.05
                    # A 503 for one answer: the task is still ours; send it again.
                    again = [a for a, r in zip(batch, body["results"]) if r["status"] == 503]
                    for r in body["results"]:
                        if r["status"] not in (202, 503):
                            log.warning("answer for task %s not taken: %s", r["token"], r.get("detail"))
                    if not again:
                        break
                    batch = again
                except (Unreachable, ApiError) as e:
                    # The service is restarting: its tasks will come again.
                    log.warning("answers not sent (%s); trying again", e)
                    if self.stop.is_set() and isinstance(e, Unreachable):
                        return
                time.sleep(pause)
                pause = min(pause * 2, 2.0)


def run_workers(
    workers: Iterable[Worker],
    client: Optional[Client] = None,
    *,
    concurrency: int = 16,
    stop: Optional[threading.Event] = None,
    poll_wait: float = 30.0,
) -> None:
    """Polls for the tasks of ``workers`` and runs them, at most
    ``concurrency`` at once, until ``stop`` is set (or forever). Survives the
    service restarting: polls back off and resume.

    Each poll waits up to ``poll_wait`` seconds for a task, so a stop takes
    effect within that (and the tasks in hand are finished and answered)."""
    client = client or Client()
    stop = stop or threading.Event()
    by_name = {w.name: w for w in workers}
    if not by_name:
        raise ValueError("give run_workers at least one @worker function")
    answers = _Answers(client, stop)
    running: Dict[str, Task] = {}
    lock = threading.Lock()
    slots = threading.Semaphore(concurrency)
    heartbeat = threading.Thread(
        target=_heartbeats, args=(client, running, lock, stop), name="multiagents-heartbeats", daemon=True
    )
    heartbeat.start()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="multiagents-worker")

    def do(task: Task) -> None:
        try:
            output = by_name[task.worker].run(task)
            answers.put({"token": task.token, "output": output})
        except WorkerError as e:
            a: Dict[str, Any] = {"token": task.token, "error": e.message, "retry": e.retry}
            if e.kind:
                a["kind"] = e.kind
            if e.retry_after_ms is not None:
                a["retry_after_ms"] = e.retry_after_ms
            answers.put(a)
        except Exception as e:  # noqa: BLE001 - any failure is reported, and retried
            log.exception("worker %s failed", task.worker)
            answers.put({"token": task.token, "error": f"{type(e).__name__}: {e}", "retry": "yes"})
        finally:
            with lock:
                running.pop(task.token, None)
            slots.release()

    pause = 0.05
    try:
        while not stop.is_set():
            # Wait for a free slot, then take as many tasks as there is room.
            if not slots.acquire(timeout=0.2):
                continue
            room = 1
            while room < min(concurrency, 100) and slots.acquire(blocking=False):
                room += 1
            try:
                body = client.request(
                    "POST",
                    "/v1/tasks/poll",
                    json={"workers": list(by_name), "max": room, "wait_ms": int(poll_wait * 1000)},
                    timeout=poll_wait + 30,
                ).json()
                pause = 0.05
            except (Unreachable, ApiError) as e:
                for _ in range(room):
                    slots.release()
                log.warning("poll failed (%s); trying again in %.2f s", e, pause)
                stop.wait(pause)
                pause = min(pause * 2, 2.0)
                continue
            tasks = [Task.of(t, client) for t in body["tasks"]]
            for _ in range(room - len(tasks)):
                slots.release()
            for task in tasks:
                with lock:
                    running[task.token] = task
                pool.submit(do, task)
    finally:
        pool.shutdown(wait=True)
        stop.set()
        answers.thread.join(timeout=10)


def _heartbeats(client: Client, running: Dict[str, Task], lock: threading.Lock, stop: threading.Event) -> None:
    """Keeps every task that has run for a third of its lease."""
    started: Dict[str, float] = {}
    while not stop.wait(0.1):
        now = time.monotonic()
        with lock:
            tasks = list(running.values())
        live = {t.token for t in tasks}
        for token in list(started):
            if token not in live:
                del started[token]
        for t in tasks:
            since = started.setdefault(t.token, now)
            if now - since >= t.lease_ms / 3000:
                try:
                    client.request("POST", f"/v1/tasks/{t.token}/heartbeat")
                    started[t.token] = now
                except ApiError as e:
                    log.warning("task %s lapsed (%s): another worker will do it", t.token, e)
                    started[t.token] = now
                except Unreachable as e:
                    log.warning("heartbeat failed (%s)", e)
