"""scripts/bench_quality.py without training anything: argument validation, the result cache, tables and files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"


@pytest.fixture(scope="module")
def bq():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: the script imports its sibling `_short_run`
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_quality", None)
        sys.path.remove(str(SCRIPT.parent))


def plan_of(bq, *argv, tmp_path=None):
    extra = ["--output-dir", str(tmp_path)] if tmp_path is not None else []
    return bq.build_plan(bq.build_parser().parse_args([*argv, *extra]))


# ------------------------------------------------------------------------------------------------- arguments
def test_default_plan_covers_every_condition(bq):
    plan = plan_of(bq)
    labels = [s.label for s in plan.scorers]
    assert labels == ["magnitude", "wanda", "sparsegpt", "mama(a=0.2,abs)"]
    assert [s.name for s in plan.settings] == ["unstructured-50", "2:4", "mlp-25", "mlp-50"]
    modes = [c.mode for c in plan.conditions]
    # One-shot: 3 scorers x 4 settings but sparsegpt on the 2 structured ones; recovered: wanda and sparsegpt (not
    # structured); trained: wanda and mama everywhere.
    assert modes[0] == "dense" and modes.count("oneshot") == 10 and modes.count("recovered") == 6
    assert modes.count("trained") == 8
    keys = [c.key for c in plan.conditions]
    assert len(set(keys)) == len(keys) and "trained__2-4__mama-a-0.2-abs" in keys
    assert "recovered__2-4__sparsegpt" in keys and "oneshot__mlp-25__sparsegpt" not in keys
    assert any("mlp-25 sparsegpt" in line for line in plan.skipped)
    b = plan.budget
    # Two thirds of the steps prune (from step 4, an event every 4), the last third recovers; text distillation on.
    assert (b.steps, b.prune_start, b.prune_end, b.prune_every) == (20, 4, 13, 4)
    assert (b.text_windows, b.text_length, b.completions, b.task) == (4, 256, 8, "arithmetic")
    # The recovery sweep's learning rate; rollout KD coef 1, no hidden-state term, seed 0.
    assert (b.learning_rate, b.distill_coef, b.hidden_coef, b.seed) == (3e-5, 1.0, 0.0, 0)
    assert plan.budget_of("trained") == bq.Budget(**{**vars(b), "learning_rate": 1e-4})  # pruning during training
    assert str(plan.output_dir) == bq.DEFAULT_OUTPUT_DIR
    assert plan.device == "cpu"


@pytest.mark.parametrize(
    "argv, recovered, trained",
    [
        ([], 3e-5, 1e-4),
        (["--learning-rate", "2e-5"], 2e-5, 2e-5),  # one rate given: both modes train at it
        (["--trained-learning-rate", "5e-5"], 3e-5, 5e-5),
        (["--learning-rate", "2e-5", "--trained-learning-rate", "5e-5"], 2e-5, 5e-5),
    ],
)
def test_each_mode_trains_at_its_learning_rate_and_is_cached_under_it(bq, argv, recovered, trained):
    plan = plan_of(bq, *argv)
    assert plan.budget_of("recovered").learning_rate == recovered
    assert plan.budget_of("trained").learning_rate == trained
    rec = bq.Condition("recovered", bq.SETTINGS["unstructured-50"], bq.Scorer("wanda"))
    tra = bq.Condition("trained", bq.SETTINGS["unstructured-50"], bq.Scorer("wanda"))
    assert plan.fingerprint(rec)["budget"]["learning_rate"] == recovered
    assert plan.fingerprint(tra)["budget"]["learning_rate"] == trained
    assert plan.fingerprint(tra)["budget"].keys() == plan.fingerprint(rec)["budget"].keys()


def test_budget_cache_key_names_only_non_default_new_fields(bq):
    """distill_coef / hidden_coef / seed came after results were cached: at their defaults they stay out of the key
    (old caches remain valid); any other value is in it, so a cached run of another budget is never reused."""
    condition = bq.Condition("recovered", bq.SETTINGS["unstructured-50"], bq.Scorer("wanda"))
    default = plan_of(bq).fingerprint(condition)["budget"]
    assert not {"distill_coef", "hidden_coef", "seed"} & default.keys()
    for flag, key, value in (("--distill-coef", "distill_coef", 0.5), ("--hidden-coef", "hidden_coef", 1.0)):
        assert plan_of(bq, flag, str(value)).fingerprint(condition)["budget"][key] == value
    assert plan_of(bq, "--seed", "1").fingerprint(condition)["budget"]["seed"] == 1


def test_mama_alpha_list_gives_one_row_each_and_quick_is_tiny(bq):
    plan = plan_of(
        bq,
        "--scorers",
        "mama",
        "wanda",
        "--mama-alpha",
        "0.1",
        "0.5",
        "0.1",
        "--quick",
        "--trained-scorers",
        "--recovered-scorers",
    )
    assert [s.label for s in plan.scorers] == ["mama(a=0.1,abs)", "mama(a=0.5,abs)", "wanda"]
    assert {c.mode for c in plan.conditions} == {"dense", "oneshot"}
    assert plan.quick and plan.budget.steps == bq.QUICK["steps"] and plan.limits == bq.QUICK["limits"]
    assert str(plan.output_dir) == bq.QUICK_OUTPUT_DIR


def test_compensate_adds_a_row_per_scorer_and_keeps_old_caches_valid(bq):
    plan = plan_of(bq, "--scorers", "wanda", "mama", "--compensate", "--trained-scorers", "--recovered-scorers")
    assert [s.label for s in plan.scorers] == ["wanda", "mama(a=0.2,abs)", "wanda+comp", "mama(a=0.2,abs)+comp"]
    plain, compensated = plan.scorers[0], plan.scorers[2]
    assert "compensate" not in plain.fingerprint() and compensated.fingerprint()["compensate"] is True
    keys = {c.key for c in plan.conditions}
    assert "oneshot__unstructured-50__wanda-comp" in keys and "oneshot__unstructured-50__wanda" in keys


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--scorers", "taylor"], "unknown scorer"),
        (["--settings", "mlp-75"], "unknown setting"),
        (["--trained-scorers", "lora"], "unknown scorer.*--trained-scorers"),
        (["--task", "nope"], "--task"),
        (["--text-windows", "-1"], "text-windows"),
        (["--mama-alpha", "0"], "wanda"),
        (["--mama-alpha", "1.5"], "mama-alpha"),
        (["--steps", "6", "--prune-end", "8"], "prune-end"),
        (["--prune-start", "0"], "gradient"),
        (["--completions", "1"], "completions"),
        (["--temperature", "0"], "temperature"),
        (["--limit", "hellaswag=5"], "TASK=N"),
        (["--limit", "piqa=0"], "positive"),
        (["--calibration-windows", "1"], "calibration-windows"),
        (["--distill-coef", "-1"], "--distill-coef"),
        (["--hidden-coef", "-0.5"], "--hidden-coef"),
        (["--trained-learning-rate", "0"], "--trained-learning-rate must be > 0"),
        (["--device", "nonsense"], "--device 'nonsense'"),
        # No machine has 99 GPUs: refused before anything loads, with or without CUDA.
        (["--device", "cuda:99"], r"no cuda device is available|this machine has \d+ cuda device"),
    ],
)
def test_bad_arguments_fail_before_anything_loads(bq, argv, match):
    with pytest.raises(ValueError, match=match):
        plan_of(bq, *argv)


def test_main_reports_bad_arguments_as_usage_errors(bq, capsys):
    with pytest.raises(SystemExit) as exc:
        bq.main(["--scorers", "magnitude", "nope"])
    assert exc.value.code == 2 and "unknown scorer(s) 'nope'" in capsys.readouterr().err


def test_limits_override_the_defaults(bq):
    assert bq.parse_limits(["piqa=20"], {"lambada": 4, "piqa": 100, "arithmetic": 8}) == {
        "lambada": 4,
        "piqa": 20,
        "arithmetic": 8,
    }


# ------------------------------------------------------------------------------------------------- results
def fake_result(bq, plan, condition, ppl, piqa, arith, zeros):
    tasks = {"lambada": {"perplexity": ppl}, "piqa": {"acc_norm": piqa}, "arithmetic": {"accuracy": arith}}
    result = {"sparsity": zeros, "eval": {"layer_sparsity": zeros, "tasks": tasks}, "seconds": {"total": 12.0}}
    return bq.condition_record(plan, condition, result)


@pytest.fixture
def fake(bq, tmp_path):
    plan = plan_of(bq, "--settings", "unstructured-50", "mlp-25", "--scorers", "wanda", "mama", tmp_path=tmp_path)
    results = {}
    for i, c in enumerate(plan.conditions):
        if c.mode == "dense":
            r = fake_result(bq, plan, c, 20.0, 0.6, 0.2, 0.0)
        else:
            r = fake_result(bq, plan, c, 40.0 + i, 0.55, 0.0 if c.mode == "oneshot" else 0.1, c.setting.sparsity)
        results[c.key] = r
    return plan, results


def test_ratios_to_dense(bq, fake):
    _, results = fake
    r = results["oneshot__unstructured-50__wanda"]
    q = bq.ratios(r, results["dense"])
    assert q["ppl"] == pytest.approx(bq.headline(r)["ppl"] / 20.0)
    assert q["piqa"] == pytest.approx(0.55 / 0.6) and q["arith"] == 0.0
    dense_zero = {**results["dense"], "eval": {"tasks": {"arithmetic": {"accuracy": 0.0}}}}
    assert bq.ratios(r, dense_zero)["arith"] is None  # no ratio to a zero accuracy


def test_markdown_tables(bq, fake):
    plan, results = fake
    results = dict(results)
    results["trained__mlp-25__wanda"] = {
        "key": "trained__mlp-25__wanda",
        "mode": "trained",
        "setting": "mlp-25",
        "scorer": "wanda",
        "error": "RuntimeError: boom",
    }
    text = bq.markdown_tables(results, {"description": bq.describe_plan(plan)})
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| setting | scorer | mode"))
    rows = []
    for line in lines[header + 2 :]:  # the main table, up to its first non-table line
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows[0].startswith("| dense | - | dense |")
    # One-shot 2 x 2, recovered wanda x 2 + sparsegpt (unstructured only), trained 2 x 2.
    assert len([r for r in rows if any(f" | {m} | " in r for m in ("oneshot", "trained", "recovered"))]) == 11
    assert "| unstructured-50 | mama(a=0.2,abs) | oneshot |" in text
    assert "92%" in text  # PIQA 0.55 / 0.6
    assert "failed: RuntimeError: boom" in text and "Failed conditions" in text
    assert "One-shot -> trained -> recovered" in text
    assert "0% -> 50% -> 50%" in text  # arithmetic 0.0 -> 0.1 (trained, recovered) of dense 0.2
    assert "Training cost and GRPO signal" in text


def test_outputs_and_cache_are_written_and_reused(bq, fake):
    pytest.importorskip("matplotlib")
    plan, results = fake
    for c in plan.conditions:
        bq.write_json_atomic(bq.cache_path(plan.output_dir, c), results[c.key])
    assert all(bq.load_cached(plan, c) == results[c.key] for c in plan.conditions)
    assert bq.mismatched_cache(plan) == []
    # Another budget: the trained conditions' cache no longer matches; one-shot and dense still do.
    other = plan_of(bq, "--settings", "unstructured-50", "mlp-25", "--scorers", "wanda", "mama", "--steps", "9")
    other.output_dir = plan.output_dir
    trained = [c.key for c in plan.conditions if c.mode in ("trained", "recovered")]
    assert sorted(bq.mismatched_cache(other)) == sorted(trained)

    markdown = bq.write_outputs(plan, results, elapsed=1.0)
    out = plan.output_dir
    assert (out / "quality.md").read_text() == markdown
    data = json.loads((out / "quality.json").read_text())
    assert set(data["results"]) == set(results) and data["meta"]["budget"]["steps"] == plan.budget.steps
    assert data["results"]["dense"]["ratio_to_dense"]["ppl"] == 1.0
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.rglob("*.tmp")]  # atomic writes leave no temporary files


def test_tables_only_rewrites_the_page_from_the_json_with_the_recorded_header(bq, fake, capsys):
    import _results_page as results_page

    plan, results = fake
    run = {
        "command": "OMP_NUM_THREADS=2 python scripts/bench_quality.py --steps 9",
        "device": "cuda (NVIDIA H200)",
        "date": "2026-12-01T00:00:00+00:00",
    }
    budget = {"steps": 20, "completions": 8, "tokens": 32, "text_windows": 4, "text_length": 256}
    meta = {"run": run, "budget": budget, "limits": plan.limits, "omp_num_threads": "2"}
    meta["description"] = bq.describe_plan(plan)
    bq.write_json_atomic(plan.output_dir / "quality.json", {"meta": meta, "results": results})

    assert bq.main(["--tables-only", "--output-dir", str(plan.output_dir)]) == 0  # no model, no matplotlib
    page = (plan.output_dir / "quality.md").read_text()
    assert capsys.readouterr().out.strip() == page.strip()
    assert page == bq.markdown_tables(results, meta, plan.output_dir)
    header = results_page.read_page_header(page)
    assert header["generated by"] == f"python scripts/bench_quality.py --tables-only --output-dir {plan.output_dir}"
    assert header["command"] == run["command"]
    assert header["device"] == "cpu, OMP_NUM_THREADS=2; last run on cuda (NVIDIA H200)"
    finished = {r["finished_at"][:10] for r in results.values()}
    assert header["date"] == results_page.date_span(r["finished_at"] for r in results.values()) == min(finished)
    assert header["budget"].startswith(f"{len(results)} conditions, 0.0 h of wall time")
    assert "20 GRPO steps x 8 completions x 32 tokens + 4 x 256 tokens of text per step" in header["budget"]

    del meta["run"]  # a JSON from before run records: the command is not recorded, never guessed
    bq.write_json_atomic(plan.output_dir / "quality.json", {"meta": meta, "results": results})
    bq.main(["--tables-only", "--output-dir", str(plan.output_dir)])
    header = results_page.read_page_header((plan.output_dir / "quality.md").read_text())
    assert header["command"] == "not recorded" and header["device"] == "cpu, OMP_NUM_THREADS=2"


def test_tables_only_without_a_json_is_a_usage_error(bq, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bq.main(["--tables-only", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2 and "quality.json" in capsys.readouterr().err


def test_self_and_mix_calibration_sample_the_dense_model(bq, tmp_path, monkeypatch):
    import torch
    from tiny import char_tokenizer, tiny_model

    from grpo_prune import data

    monkeypatch.setattr(data, "self_generated_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(data, "SELF_MAX_NEW_TOKENS", {"task": 6, "open": 10})
    tok, model = char_tokenizer(), tiny_model()
    mix = bq.calibration_batches(tok, bq.Calibration("mix", 10, 16), model)
    assert [tuple(b.shape) for b in mix] == [(8, 16), (2, 16)]  # batches of 8 windows, taken before pruning
    windows = torch.cat(mix)
    assert torch.equal(windows, data.calibration_windows(tok, "mix", 10, 16, model=model))
    assert torch.equal(windows[:5], data.calibration_windows(tok, "python_docs", 5, 16))  # half the built-in text
    assert "own samples" in bq.describe_calibration(bq.Calibration("self", 4, 16))
    with pytest.raises(ValueError, match="pass model="):
        bq.calibration_batches(tok, bq.Calibration("self", 2, 16))
