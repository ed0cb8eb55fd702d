"""The HTTP client of a multiagents service: runs, definitions, dead letters."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import httpx

DEFAULT_SERVER = "http://127.0.0.1:7430"

#: The statuses a run ends in.
TERMINAL = frozenset(
    {"completed", "compensated", "failed", "compensation_failed", "cancelled", "timed_out"}
)


class ApiError(Exception):
    """A problem the service answered (RFC 9457): what was wrong, and which
    request field."""

    def __init__(self, status: int, problem: Mapping[str, Any]):
        self.status = status
        self.type: str = str(problem.get("type", "about:blank"))
        self.title: str = str(problem.get("title", ""))
        self.detail: str = str(problem.get("detail", ""))
        self.field: Optional[str] = problem.get("field")
        where = f" ({self.field})" if self.field else ""
        super().__init__(f"{status} {self.title}: {self.detail}{where}")


class Unreachable(Exception):
    """The service could not be reached at its address."""

    def __init__(self, address: str, cause: Exception):
        self.address = address
        super().__init__(f"the multiagents service at {address} cannot be reached: {cause}")


@dataclass
class Run:
    """A run as a start, retry or result answers it."""

    id: str
    status: str
    url: str
    workflow: Optional[str] = None
    output: Any = None
    failure: Any = None
    retry_of: Optional[str] = None
    #: True when the answer was 200 for a known Idempotency-Key.
    existed: bool = False

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def of(cls, body: Mapping[str, Any], existed: bool = False) -> "Run":
        return cls(
            id=body["id"],
            status=body["status"],
            url=body["url"],
            workflow=body.get("workflow"),
            output=body.get("output"),
            failure=body.get("failure"),
            retry_of=body.get("retry_of"),
            existed=existed,
        )


@dataclass
class Page:
    """One page of a run listing; ``next`` is the cursor of the next one."""

    runs: List[Dict[str, Any]] = field(default_factory=list)
    next: Optional[str] = None


def _wait(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    return f"{max(0, int(seconds * 1000))}ms"


class Client:
    """Talks to ``multiagents serve``.

    ``server`` defaults to ``$MULTIAGENTS_SERVER`` or http://127.0.0.1:7430;
    ``api_key`` to ``$MULTIAGENTS_API_KEY``. Thread-safe: workers share one.
    """

    def __init__(
        self,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        transport: Optional[httpx.BaseTransport] = None,
    ):
        self.server = (server or os.environ.get("MULTIAGENTS_SERVER") or DEFAULT_SERVER).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("MULTIAGENTS_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.server,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # The one place requests are made.
    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: Optional[Union[str, bytes]] = None,
        params: Optional[Mapping[str, Any]] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        kwargs: Dict[str, Any] = {"params": params, "headers": dict(headers or {})}
        if json is not None:
            kwargs["json"] = json
        if content is not None:
            kwargs["content"] = content
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=5.0)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise Unreachable(self.server, e) from e
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text}
            raise ApiError(response.status_code, problem)
        return response

    # Definitions.
    def deploy(self, definition: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
        """Deploys a definition: YAML text, or a dict (sent as JSON)."""
        if isinstance(definition, str):
            r = self.request(
                "POST",
                "/v1/definitions",
                content=definition,
                headers={"Content-Type": "application/yaml"},
            )
        else:
            r = self.request("POST", "/v1/definitions", json=dict(definition))
        return r.json()

    def definitions(self) -> List[Dict[str, Any]]:
        return self.request("GET", "/v1/definitions").json()["definitions"]

    def definition(self, name: str, version: Optional[int] = None) -> Dict[str, Any]:
        return self.request("GET", f"/v1/definitions/{name}", params={"version": version}).json()

    # Runs.
    def start(
        self,
        workflow: str,
        input: Any = None,
        *,
        idempotency_key: Optional[str] = None,
        wait: Optional[float] = None,
        version: Optional[int] = None,
        priority: Optional[str] = None,
        correlation_id: Optional[str] = None,
        on_conflict: Optional[str] = None,
    ) -> Run:
        """Starts a run of ``workflow`` with ``input``; with ``wait`` (seconds),
        answers with its outcome if it ends in time. The same
        ``idempotency_key`` gives the same run (``existed`` then)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        r = self.request(
            "POST",
            f"/v1/workflows/{workflow}/runs",
            content=_json_text(input),
            headers={"Content-Type": "application/json", **headers},
            params={
                "wait": _wait(wait),
                "version": version,
                "priority": priority,
                "correlation_id": correlation_id,
                "on_conflict": on_conflict,
            },
            timeout=None if wait is None else wait + 30,
        )
        return Run.of(r.json(), existed=r.status_code == 200)

    def get(self, run_id: str) -> Dict[str, Any]:
        """A run's state: its steps and history."""
        return self.request("GET", f"/v1/runs/{run_id}").json()

    def output(self, run_id: str, step: str) -> Any:
        """One completed step's output (raises ``ApiError`` 404 when the step
        has not completed)."""
        from urllib.parse import quote

        return self.request("GET", f"/v1/runs/{run_id}/outputs/{quote(step, safe='')}").json()

    def result(self, run_id: str, wait: Optional[float] = None) -> Run:
        """The outcome, or the run still running when ``wait`` ran out."""
        r = self.request(
            "GET",
            f"/v1/runs/{run_id}/result",
            params={"wait": _wait(wait)},
            timeout=None if wait is None else wait + 30,
        )
        return Run.of(r.json())

    def wait(self, run_id: str, timeout: float = 60.0) -> Run:
        """Waits until the run has finished, at most ``timeout`` seconds, and
        returns its outcome; raises ``TimeoutError`` otherwise."""
        until = time.monotonic() + timeout
        while True:
            left = until - time.monotonic()
            run = self.result(run_id, wait=max(0.0, min(left, 30.0)))
            if run.finished:
                return run
            if left <= 0:
                raise TimeoutError(f"run {run_id} is still {run.status} after {timeout} s")

    def list(
        self,
        *,
        status: Optional[str] = None,
        workflow: Optional[str] = None,
        correlation_id: Optional[str] = None,
        started_after: Optional[int] = None,
        started_before: Optional[int] = None,
        limit: int = 100,
        cursor: Optional[str] = None,
    ) -> Page:
        """One page of runs, newest first; pass ``page.next`` as ``cursor``."""
        body = self.request(
            "GET",
            "/v1/runs",
            params={
                "status": status,
                "workflow": workflow,
                "correlation_id": correlation_id,
                "started_after": started_after,
                "started_before": started_before,
                "limit": limit,
                "cursor": cursor,
            },
        ).json()
        return Page(runs=body["runs"], next=body.get("next"))

    def iter_runs(self, **filters: Any) -> Iterator[Dict[str, Any]]:
        """Every run that matches, page after page."""
        cursor = None
        while True:
            page = self.list(cursor=cursor, **filters)
            yield from page.runs
            if not page.next:
                return
            cursor = page.next

    def signal(self, run_id: str, name: str, data: Any = None) -> None:
        self.request(
            "POST",
            f"/v1/runs/{run_id}/signals/{name}",
            content=_json_text(data),
            headers={"Content-Type": "application/json"},
        )

    def cancel(self, run_id: str, reason: Optional[str] = None) -> bool:
        body = {"reason": reason} if reason else None
        return bool(self.request("POST", f"/v1/runs/{run_id}/cancel", json=body).json()["cancelled"])

    def retry(
        self,
        run_id: str,
        *,
        from_step: Optional[str] = None,
        input_patch: Any = None,
        definition: Optional[str] = None,
        wait: Optional[float] = None,
    ) -> Run:
        """Retries a failed, compensated, timed-out or cancelled run as a new
        run; ``input_patch`` is an RFC 7386 merge patch for its input."""
        body: Dict[str, Any] = {}
        if from_step is not None:
            body["from_step"] = from_step
        if input_patch is not None:
            body["input"] = input_patch
        if definition is not None:
            body["definition"] = definition
        r = self.request(
            "POST",
            f"/v1/runs/{run_id}/retry",
            json=body,
            params={"wait": _wait(wait)},
            timeout=None if wait is None else wait + 30,
        )
        return Run.of(r.json())

    # Dead letters.
    def dead_letters(self, limit: int = 100) -> List[Dict[str, Any]]:
        return self.request("GET", "/v1/dead-letters", params={"limit": limit}).json()["dead_letters"]

    def dead_letter(self, letter_id: str) -> Dict[str, Any]:
        return self.request("GET", f"/v1/dead-letters/{letter_id}").json()

    def redrive(self, letter_id: str, *, payload: Any = None, body: Any = None) -> Dict[str, Any]:
        """Sends a dead letter back, optionally with its event's ``payload`` (or
        the whole event, ``body``) edited."""
        edit: Dict[str, Any] = {}
        if payload is not None:
            edit["payload"] = payload
        if body is not None:
            edit["body"] = body
        return self.request("POST", f"/v1/dead-letters/{letter_id}/redrive", json=edit).json()

    def redrive_all(self, *, dry_run: bool = False, limit: Optional[int] = None, **filter: str) -> Dict[str, Any]:
        """Redrives every dead letter matching ``filter`` (topic, workflow,
        step, reason); with ``dry_run``, only counts them."""
        body: Dict[str, Any] = {"filter": filter, "dry_run": dry_run}
        if limit is not None:
            body["limit"] = limit
        return self.request("POST", "/v1/dead-letters/redrive", json=body).json()

    def discard(self, letter_id: str, reason: Optional[str] = None) -> None:
        body = {"reason": reason} if reason else None
        self.request("DELETE", f"/v1/dead-letters/{letter_id}", json=body)

    def dead_letter_audit(self, limit: int = 100) -> List[Dict[str, Any]]:
        return self.request("GET", "/v1/dead-letters/audit", params={"limit": limit}).json()["audit"]

    # Operations.
    def workers(self) -> List[Dict[str, Any]]:
        return self.request("GET", "/v1/workers").json()["workers"]

    def me(self) -> Dict[str, Any]:
        return self.request("GET", "/v1/me").json()


def _json_text(value: Any) -> str:
    import json

    return json.dumps(value)
