"""The e-commerce example runs against a real `multiagents serve`."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ecommerce_order.py"


def test_the_ecommerce_example_completes_four_orders_and_compensates_one(served):
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env={**os.environ, "MULTIAGENTS_SERVER": served.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "order 5: compensated (card declined)" in out.stdout, out.stdout
    assert out.stdout.count(": completed") == 4, out.stdout
