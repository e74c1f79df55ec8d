"""The GPU device check's CPU dry mode (scripts/device_check.py --dry): every section runs and its table holds real
figures, so the script still works whenever a GPU is lent."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_dry_runs_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "device_check.py"), "--dry", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "device_check.json").read_text())
    assert set(results) == {"quickstart", "export", "fsdp2", "tests"}

    quick = {row["variant"]: row for row in results["quickstart"]}
    assert len(quick) == 4
    plain = quick["plain TRL GRPOTrainer"]
    assert plain["x_plain"] == 1.0 and plain["sparsity"] == 0.0
    for label, row in quick.items():
        assert row["median_step_s"] > 0 and row["steps_timed"] == 3, label
        if label != "plain TRL GRPOTrainer":
            assert row["sparsity"] == 0.5, label  # the pruner really ran to its target
            assert row["events_timed"] == 1, label  # the event at step 2 is seen, and told apart
            assert row["x_plain"] == row["median_step_s"] / plain["median_step_s"]

    export = {(r["model"], r["what"].split()[0]): r for r in results["export"]}
    assert export[("sliced", "prefill")]["params"] < export[("dense", "prefill")]["params"]
    assert all(r["median_s"] > 0 for r in export.values())

    fsdp2 = results["fsdp2"]
    assert fsdp2["exit"] == 0 and fsdp2["steps"] == 3 and fsdp2["sparsity"] == 0.5, fsdp2["tail"]
    assert fsdp2["sharded"] is False  # accelerate's FSDP plugin does not engage on a CPU

    tests = results["tests"]
    assert tests["exit"] == 0 and tests.get("skipped", 0) >= 1 and tests.get("failed", 0) == 0  # CUDA tests skip here

    table = (tmp_path / "device_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sections = [row.split(" | ")[0].strip("| ") for row in rows]
    assert sections == ["quickstart step"] * 4 + ["structured export"] * 4 + ["FSDP2 + distillation", "device tests"]
    assert "FAILED" not in table
    assert "- device: CPU" in table
