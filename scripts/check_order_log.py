#!/usr/bin/env python3
"""Checks an e-commerce run's JSON log: every order that started can be
followed by its transaction_id to its end, and a completed order's every step
is there. Usage: check_order_log.py LOG.jsonl"""
import json
import sys
from collections import defaultdict

STEPS = {"validate", "fraud_check", "address_check", "inventory", "payment", "fulfilment",
         "confirmation", "notification"}
# Runs only when the order asks for it; otherwise logged as skipped.
OPTIONAL = "gift_wrap"

lines = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]
by_tx = defaultdict(list)
for line in lines:
    tx = line.get("transaction_id") or next(
        (s.get("transaction_id") for s in line.get("spans", []) if s.get("transaction_id")), None)
    if tx:
        by_tx[tx].append(line)
started = [tx for tx, ls in by_tx.items() if any(l["message"] == "workflow started" for l in ls)]
problems = []
for tx in started:
    ls = by_tx[tx]
    finished = [l for l in ls if l["message"] == "workflow finished"]
    if not finished:
        problems.append(f"{tx}: no 'workflow finished' line")
        continue
    done = {l.get("step") for l in ls if l["message"] == "step completed"}
    skipped = {l.get("step") for l in ls if l["message"].startswith("step skipped")}
    if finished[0]["status"] == "completed" and (OPTIONAL in done) == (OPTIONAL in skipped):
        problems.append(f"{tx}: completed, but `{OPTIONAL}` is neither completed nor skipped once")
    done.discard(OPTIONAL)
    if finished[0]["status"] == "completed" and done != STEPS:
        problems.append(f"{tx}: completed, but steps logged as completed are {sorted(done)}")
    if finished[0]["status"] == "compensated" and not any(
            l["message"] == "step compensated" for l in ls) and done:
        problems.append(f"{tx}: compensated, but no 'step compensated' line")
if not started or problems:
    print(f"{sys.argv[1]}: {len(started)} orders; problems:", *problems, sep="\n  ")
    sys.exit(1)
print(f"{sys.argv[1]}: every step of all {len(started)} orders found by transaction_id")
