"""scripts/sweep_recovery.py without training anything: the conditions it asks bench_quality for, every variant's
arguments, and the table it collects from finished condition files."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(SCRIPTS))  # as when run: the script imports its siblings
    try:
        yield importlib.import_module("sweep_recovery")
    finally:
        sys.modules.pop("sweep_recovery", None)
        sys.modules.pop("bench_quality", None)
        sys.path.remove(str(SCRIPTS))


def test_condition_args_select_exactly_the_sweep_conditions(sweep):
    bq = sweep.bq
    plan = bq.build_plan(bq.build_parser().parse_args(sweep.BASE + sweep.condition_args()))
    measured = {c.key for c in plan.conditions if c.mode != "dense"}
    wanted = {bq.Condition(m, bq.SETTINGS[s], sweep._scorer(c)).key for m, s, c in sweep.CONDITIONS}
    assert measured == wanted
    assert "trained__unstructured-50__mama-a-0.2-abs" in measured


@pytest.mark.parametrize(
    "name", ["lr1e-4", "lr3e-5", "lr1e-4-roll0", "lr1e-4-hidden1", "lr3e-5-early", "lr3e-5-seed1"]
)
def test_every_variant_is_a_valid_budget_that_differs_from_the_base(sweep, name):
    bq = sweep.bq
    base = bq.build_plan(bq.build_parser().parse_args(sweep.BASE)).budget
    budget = bq.build_plan(bq.build_parser().parse_args(sweep.BASE + sweep.VARIANTS[name][1])).budget
    assert budget.steps == 20
    changed = {k for k, v in vars(budget).items() if getattr(base, k) != v}
    expected = {
        "lr1e-4": {"learning_rate"},
        "lr3e-5": set(),  # the benchmark's default learning rate
        "lr1e-4-roll0": {"learning_rate", "distill_coef"},
        "lr1e-4-hidden1": {"learning_rate", "hidden_coef"},
        "lr3e-5-early": {"prune_start", "prune_end", "prune_every"},
        "lr3e-5-seed1": {"seed"},
    }[name]
    assert changed == expected


def test_every_variant_plans_the_same_conditions(sweep):
    bq = sweep.bq
    for _, extra in sweep.VARIANTS.values():
        plan = bq.build_plan(bq.build_parser().parse_args(sweep.BASE + extra + sweep.condition_args()))
        assert len(plan.conditions) == 1 + len(sweep.CONDITIONS)


def _record(key, mode, setting, scorer, ppl, piqa, arith, train=None):
    return {
        "key": key,
        "mode": mode,
        "setting": setting,
        "scorer": scorer,
        "device": "cuda",
        "sparsity": 0.5 if mode != "dense" else 0.0,
        "eval": {
            "tasks": {
                "lambada": {"perplexity": ppl},
                "piqa": {"acc_norm": piqa},
                "arithmetic": {"accuracy": arith},
            }
        },
        "seconds": {"train": 90.0},
        **({"train": train} if train else {}),
    }


def test_collect_gives_ratios_to_the_variants_dense_and_the_table_lists_them(sweep, tmp_path):
    folder = tmp_path / "lr3e-5" / "conditions"
    folder.mkdir(parents=True)
    (folder / "dense.json").write_text(json.dumps(_record("dense", "dense", None, None, 40.0, 0.6, 0.4)))
    train = {
        "tokens": {"total": 37000},
        "cpu_seconds": 91.0,
        "frac_reward_zero_std_median": 0.0,
        "clipped_ratio_median": 0.125,
    }
    key = "recovered__unstructured-50__sparsegpt"
    record = _record(key, "recovered", "unstructured-50", "sparsegpt", 100.0, 0.57, 0.3, train)
    (folder / f"{key}.json").write_text(json.dumps(record))
    rows = sweep.collect(tmp_path)
    assert len(rows) == 1
    row = rows[0]
    assert row["variant"] == "lr3e-5" and row["tokens"] == 37000
    assert row["ppl_ratio"] == pytest.approx(2.5) and row["piqa_ratio"] == pytest.approx(0.95)
    assert row["arith_ratio"] == pytest.approx(0.75)
    text = sweep.markdown(rows)
    assert (
        "| recovered unstructured-50 sparsegpt | lr3e-5 | 2.5x | 95 | 75 | 37000 | 90 | 0.00 | 0.12 | cuda |" in text
    )
    assert "`lr3e-5`: 1 conditions, ppl 2.50x, arithmetic 75%" in text


def test_collect_writes_the_page_header_and_keeps_the_recorded_command(sweep, tmp_path):
    import _results_page as results_page

    folder = tmp_path / "lr3e-5" / "conditions"
    folder.mkdir(parents=True)
    (folder / "dense.json").write_text(json.dumps(_record("dense", "dense", None, None, 40.0, 0.6, 0.4)))
    key = "recovered__unstructured-50__wanda"
    record = _record(key, "recovered", "unstructured-50", "wanda", 80.0, 0.6, 0.4, {"tokens": {"total": 9}})
    record["finished_at"] = "2026-11-30T17:00:00+00:00"
    record["fingerprint"] = {"budget": {"steps": 20, "completions": 8, "tokens": 32, "text_windows": 0}}
    (folder / f"{key}.json").write_text(json.dumps(record))
    argv = ["--collect", "--output-dir", str(tmp_path), "--reference", str(tmp_path / "none.json")]

    assert sweep.main(argv) == 0
    header = results_page.read_page_header((tmp_path / "sweep.md").read_text())
    assert header["generated by"] == f"python scripts/sweep_recovery.py --collect --output-dir {tmp_path}"
    assert (header["command"], header["device"], header["date"]) == ("not recorded", "cuda", "2026-11-30")
    assert header["budget"].startswith("1 conditions in 1 variants, 0.0 h of training loops in all")
    assert "20 GRPO steps x 8 completions x 32 tokens, tokens of text distilled per step: no" in header["budget"]

    # The run that measured recorded its command in sweep.json; --collect keeps it.
    data = json.loads((tmp_path / "sweep.json").read_text())
    data["run"] = {"command": "python scripts/sweep_recovery.py --device cuda --jobs 13", "device": "cuda (H200)"}
    (tmp_path / "sweep.json").write_text(json.dumps(data))
    assert sweep.main(argv) == 0
    header = results_page.read_page_header((tmp_path / "sweep.md").read_text())
    assert header["command"] == "python scripts/sweep_recovery.py --device cuda --jobs 13"
    assert json.loads((tmp_path / "sweep.json").read_text())["run"]["device"] == "cuda (H200)"
