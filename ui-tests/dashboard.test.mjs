// The dashboard in a real browser: a real `multiagents serve` (embedded, on a
// free port, in a temporary directory), HTTP workers in this process that
// talk to it as any other language's would, and headless Chromium driven by
// playwright-core. Screenshots of each page go to $SCREENSHOTS (default
// target/ui-screenshots); docs/ui.md shows them.
//
//   MULTIAGENTS_BIN=target/debug/multiagents node --test ui-tests/dashboard.test.mjs

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const BIN = process.env.MULTIAGENTS_BIN || join(ROOT, "target/debug/multiagents");
const SHOTS = process.env.SCREENSHOTS || join(ROOT, "target/ui-screenshots");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

const DEFINITIONS = [
  `name: shop
version: 1
steps:
  - name: reserve
    worker: reserve_stock
    compensation: release_stock
  - name: charge
    worker: charge_card
    compensation: refund_card
  - name: ship
    worker: ship_parcel
`,
  `name: approval
version: 1
steps:
  - name: draft
    worker: write_draft
  - name: review
    signal: approve
  - name: publish
    worker: publish_doc
`,
  `name: trip
version: 1
steps:
  - name: plan
    worker: write_draft
  - name: buy
    workflow: shop
`,
  `name: booking
version: 1
steps:
  - name: room
    worker: reserve_room
    compensation: release_room
  - name: card
    worker: charge_booking
`,
];

// ------------------------------------------------------------------ the service

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
    s.on("error", fail);
  });
}

class Served {
  constructor(extra = []) {
    this.dir = mkdtempSync(join(tmpdir(), "multiagents-ui-"));
    this.extra = extra;
    this.log = "";
  }

  async start() {
    this.port = await freePort();
    this.url = `http://127.0.0.1:${this.port}`;
    this.process = spawn(BIN, ["serve", "--listen", `127.0.0.1:${this.port}`, "--store", join(this.dir, "store"), ...this.extra], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    await new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`serve did not start:\n${this.log}`)), 30000);
      this.process.stderr.on("data", (d) => {
        this.log += d;
        if (/serving http:\/\//.test(this.log)) { clearTimeout(timer); ok(); }
      });
      this.process.on("exit", (code) => { clearTimeout(timer); fail(new Error(`serve exited (${code}):\n${this.log}`)); });
    });
    return this;
  }

  stop() {
    if (this.process && this.process.exitCode === null) this.process.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// A JSON call to the service; throws with the problem's detail on an error.
async function call(base, method, path, body, key) {
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload;
  if (typeof body === "string") { payload = body; headers["Content-Type"] = "application/yaml"; }
  else if (body !== undefined) { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  const res = await fetch(base + path, { method, headers, body: payload });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return data;
}

// ------------------------------------------------------------------ HTTP workers

// One long-polling loop for every worker type, answering with `behave[worker](task)`:
// an output, or throw {error, retry} to fail the attempt.
class Workers {
  constructor(base, behave, key) {
    this.base = base;
    this.behave = behave;
    this.key = key;
    this.calls = [];
    this.running = true;
    this.loop = this.run();
  }

  async run() {
    const workers = Object.keys(this.behave);
    while (this.running) {
      let tasks = [];
      try {
        ({ tasks } = await call(this.base, "POST", "/v1/tasks/poll", { workers, wait_ms: 500 }, this.key));
      } catch (e) {
        if (!this.running) return;
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      for (const task of tasks) {
        this.calls.push(task);
        try {
          const output = await this.behave[task.worker](task);
          await call(this.base, "POST", `/v1/tasks/${task.token}/complete`, { output }, this.key);
        } catch (e) {
          if (e && e.error) await call(this.base, "POST", `/v1/tasks/${task.token}/fail`, e, this.key);
          else throw e;
        }
      }
    }
  }

  async stop() {
    this.running = false;
    await this.loop.catch(() => {});
  }
}

// ------------------------------------------------------------------ set-up

let served, workers, browser, page;
// What the compensations and the booking's release do on their next call.
const flaky = { releaseRoomFails: true };

async function until(what, probe, timeout = 15000) {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function shot(name) {
  mkdirSync(SHOTS, { recursive: true });
  // Not the toast of the step before.
  await page.evaluate(() => { const t = document.getElementById("toast"); t.style.transition = "none"; t.className = ""; });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

const api = (method, path, body) => call(served.url, method, path, body);

before(async () => {
  served = await new Served().start();
  for (const d of DEFINITIONS) await api("POST", "/v1/definitions", d);
  workers = new Workers(served.url, {
    reserve_stock: (t) => ({ reserved: t.input.items || 1 }),
    release_stock: () => ({ released: true }),
    charge_card: (t) => ({ charged: t.input.amount }),
    refund_card: (t) => ({ refunded: t.input.amount }),
    ship_parcel: (t) => {
      if (t.input.address === "nowhere") throw { error: `cannot ship to ${t.input.address}`, kind: "bad_address", retry: "no" };
      return { shipped_to: t.input.address };
    },
    write_draft: () => ({ draft: "v1" }),
    publish_doc: (t) => ({ published: true, approved_by: t.steps.review && t.steps.review.by }),
    reserve_room: () => ({ room: 101 }),
    release_room: () => {
      if (flaky.releaseRoomFails) throw { error: "the hotel's API is down", kind: "unavailable", retry: "no" };
      return { released: 101 };
    },
    charge_booking: () => { throw { error: "card declined", kind: "declined", retry: "no" }; },
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("pageerror", (e) => { throw new Error(`the page threw: ${e.message}`); });
});

after(async () => {
  if (browser) await browser.close();
  if (workers) await workers.stop();
  if (served) served.stop();
});

// ------------------------------------------------------------------ the tests

test("the run list updates live when a run starts and when it ends", async () => {
  await page.goto(`${served.url}/ui/#/runs`);
  await page.waitForSelector("#runs-page");
  await page.waitForSelector("#live:not(.off)");
  const before = Number(await page.textContent('[data-count="total"]'));
  const run = await api("POST", "/v1/workflows/shop/runs", { amount: 30, address: "Main St" });
  // No reload: the row arrives over the event stream, then turns completed.
  await page.waitForSelector(`tr[data-id="${run.id}"]`, { timeout: 10000 });
  await page.waitForSelector(`tr[data-id="${run.id}"] [data-status="completed"]`, { timeout: 10000 });
  await until("the counts to move", async () => Number(await page.textContent('[data-count="total"]')) === before + 1);
  assert.equal(await page.evaluate(() => performance.getEntriesByType("navigation").length), 1, "the page was not reloaded");
  // A filter narrows the list.
  await page.selectOption('#run-filters select[name="status"]', "compensated");
  await page.click('#run-filters button[type="submit"]');
  await page.waitForFunction(() => location.hash.includes("status=compensated"));
  await page.waitForSelector(`tr[data-id="${run.id}"]`, { state: "detached" });
});

let compensatedRun;

test("a compensated run's timeline shows its compensations after the failure", async () => {
  const run = await api("POST", "/v1/workflows/shop/runs?wait=10s", { amount: 70, address: "nowhere", items: 2 });
  assert.equal(run.status, "compensated", JSON.stringify(run));
  compensatedRun = run.id;
  await page.goto(`${served.url}/ui/#/runs/${run.id}`);
  await page.waitForSelector('#run-page[data-status="compensated"]');
  // The failed step's bar, then a compensation bar for each completed step.
  await page.waitForSelector('.bar[data-step="ship"][data-outcome="failed"]');
  for (const step of ["charge", "reserve"]) {
    await page.waitForSelector(`.bar.compensation[data-step="${step}"][data-outcome="completed"]`);
  }
  const [failedAt, compensatedAt] = await page.evaluate(() => {
    const left = (sel) => parseFloat(document.querySelector(sel).style.left);
    return [left('.bar[data-step="ship"][data-outcome="failed"]'), left('.bar.compensation[data-step="charge"]')];
  });
  assert.ok(compensatedAt >= failedAt, `the compensation (${compensatedAt}%) starts after the failure (${failedAt}%)`);
  await page.waitForSelector('[data-marker="step `ship` failed"]');
  assert.match(await page.textContent("#failure"), /cannot ship to nowhere/);
  // Each attempt's lifecycle names the worker process that ran it.
  await page.click('[data-step-details="charge"] summary');
  const table = await page.textContent('[data-step-details="charge"] table');
  assert.match(table, /compensate/);
  assert.match(await page.textContent('[data-step-details="charge"]'), /"amount": 70/);
  await shot("run-compensated");
});

test("a retry with an edited input from the run page succeeds", async () => {
  assert.ok(compensatedRun, "the compensated run of the test before");
  await page.goto(`${served.url}/ui/#/runs/${compensatedRun}`);
  await page.click('button[data-action="retry"]');
  await page.waitForSelector("#retry-form");
  assert.equal(await page.inputValue('#retry-form select[name="from_step"]'), "ship");
  const input = JSON.parse(await page.inputValue("#retry-input"));
  input.address = "Main St";
  await page.fill("#retry-input", JSON.stringify(input, null, 2));
  // The change is shown as a diff before it is sent.
  await page.waitForSelector('#retry-diff .add:has-text("Main St")');
  await page.waitForSelector('#retry-diff .del:has-text("nowhere")');
  await shot("run-retry");
  await page.click("#retry-submit");
  await page.waitForFunction((old) => location.hash.startsWith("#/runs/") && !location.hash.includes(old), compensatedRun);
  await page.waitForSelector('#run-page[data-status="completed"]', { timeout: 10000 });
  const id = page.url().split("#/runs/")[1];
  const result = await api("GET", `/v1/runs/${id}/result`);
  assert.equal(result.status, "completed");
  assert.deepEqual(result.output.ship, { shipped_to: "Main St" });
  await shot("run-completed");
});

test("a signal sent from the form completes a waiting run", async () => {
  const run = await api("POST", "/v1/workflows/approval/runs", { title: "Q3 report" });
  await page.goto(`${served.url}/ui/#/runs/${run.id}`);
  // The wait is drawn as a wait, still open.
  await page.waitForSelector('.bar.wait[data-step="review"][data-outcome="in_flight"]', { timeout: 10000 });
  await shot("run-waiting");
  await page.click('button[data-action="signal"]');
  assert.equal(await page.inputValue('#signal-form select[name="name"]'), "approve");
  await page.fill("#signal-data", '{"by": "ada"}');
  await page.click('#signal-form button[type="submit"]');
  await page.waitForSelector('#run-page[data-status="completed"]', { timeout: 10000 });
  await page.waitForSelector('.bar.wait[data-step="review"]:not([data-outcome="in_flight"])');
  const result = await api("GET", `/v1/runs/${run.id}/result`);
  assert.deepEqual(result.output.publish, { published: true, approved_by: "ada" });
});

test("a dead letter is redriven from its page", async () => {
  flaky.releaseRoomFails = true;
  const run = await api("POST", "/v1/workflows/booking/runs?wait=10s", { guest: "grace" });
  assert.equal(run.status, "compensation_failed", JSON.stringify(run));
  await page.goto(`${served.url}/ui/#/dead-letters`);
  const link = await page.waitForSelector("#letters-page tr[data-letter] a");
  assert.match(await page.textContent("#letters-page tbody"), /the hotel's API is down/);
  await shot("dead-letters");
  await link.click();
  await page.waitForSelector("#letter-page");
  assert.match(await page.textContent("#letter-page"), /compensations/);
  // Not an event with a payload: its whole body is the edit, as JSON.
  assert.match(await page.inputValue("#letter-payload"), /\n  "step": "room"/);
  await shot("dead-letter");
  flaky.releaseRoomFails = false;
  await page.click('button[data-action="redrive"]');
  await page.waitForFunction(() => location.hash === "#/dead-letters");
  const done = await api("GET", `/v1/runs/${run.id}/result?wait=10s`);
  assert.equal(done.status, "compensated", JSON.stringify(done));
  await page.waitForSelector("#letters-page");
  assert.equal(await page.$(`#letters-page tr[data-letter]`), null, "the letter left the list");
  await page.waitForSelector("#letters-page [data-audit]");
});

test("a sub-workflow expands in place on its parent's timeline", async () => {
  const run = await api("POST", "/v1/workflows/trip/runs?wait=10s", { amount: 5, address: "Elm St" });
  assert.equal(run.status, "completed", JSON.stringify(run));
  await page.goto(`${served.url}/ui/#/runs/${run.id}`);
  await page.waitForSelector('.bar.workflow[data-step="buy"][data-outcome="completed"]');
  await page.click('[data-expand="buy"]');
  // The child's own lanes, under the parent's.
  for (const step of ["reserve", "charge", "ship"]) {
    await page.waitForSelector(`.child .gantt .bar[data-step="${step}"][data-outcome="completed"]`);
  }
  await shot("run-sub-workflow");
});

test("workers, definitions with their diagram, and charts render", async () => {
  // HTTP workers show too: the service heartbeats for them every 5 s.
  await page.goto(`${served.url}/ui/#/workers`);
  await until("the HTTP workers' heartbeat", async () => {
    await page.reload();
    await page.waitForSelector("#workers-page h1");
    return page.$('[data-worker="ship_parcel"]');
  }, 20000);
  const ship = await page.textContent('[data-worker="ship_parcel"]');
  assert.match(ship, /bad_address/, "the latest errors, by kind");
  assert.match(ship, /http-\d+/, "the process");
  await shot("workers");
  await page.goto(`${served.url}/ui/#/definitions/shop`);
  await page.waitForSelector('#diagram[data-rendered="true"] svg', { timeout: 15000 });
  assert.match(await page.textContent("#diagram"), /charge/);
  await shot("definition");
  await page.goto(`${served.url}/ui/#/charts`);
  await page.waitForSelector('[data-chart="Workflows"] svg');
  // Even the first sample shows: the latest value of each series is a dot.
  await page.waitForSelector('[data-chart="Workflows"] circle[data-series="started / s"]');
  // A process younger than an hour is charted from its first sample.
  assert.match(await page.textContent('[data-chart="Workflows"] [data-axis="from"]'), /^\d+ min ago$/);
  await shot("charts");
  await page.goto(`${served.url}/ui/#/runs`);
  await page.waitForSelector("#runs-page tr[data-id]");
  await shot("runs");
});

test("with keys required, the page asks for one and hides what the key may not do", async () => {
  const keysDir = mkdtempSync(join(tmpdir(), "multiagents-keys-"));
  const file = join(keysDir, "keys.txt");
  const newKey = (name, scope) => execFileSync(BIN, ["keys", "new", name, "--scopes", scope, "--file", file], { stdio: ["ignore", "pipe", "ignore"] }).toString().trim().split(/\s+/).pop();
  const reader = newKey("viewer", "read");
  const operator = newKey("operator", "operate");
  const admin = newKey("admin", "admin");
  const secured = await new Served(["--api-keys", file]).start();
  const context = await browser.newContext();
  const p = await context.newPage();
  try {
    await call(secured.url, "POST", "/v1/definitions", DEFINITIONS[0], admin);
    const run = await call(secured.url, "POST", "/v1/workflows/shop/runs", { amount: 1, address: "x" }, operator);
    await p.goto(`${secured.url}/ui/#/runs/${run.id}`);
    await p.waitForSelector("#key-dialog[open]");
    await p.fill("#key-input", reader);
    await p.click('#key-form button[type="submit"]');
    await p.waitForSelector("#run-page");
    assert.match(await p.textContent("#who"), /viewer/);
    assert.equal(await p.$('button[data-action="cancel"]'), null, "a read key sees no Cancel");
    // Another key, with the operate scope, sees it.
    await p.evaluate((k) => localStorage.setItem("multiagents.key", k), operator);
    await p.reload();
    await p.waitForSelector('button[data-action="cancel"]');
  } finally {
    await context.close();
    secured.stop();
    rmSync(keysDir, { recursive: true, force: true });
  }
});
