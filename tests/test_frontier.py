"""scripts/frontier.py without running a model: the commands each method's point is made by, the order of the
points, the headline rule, the tables, what is read from a training command's log (a fake ``grpo-prune`` on the
PATH stands in for the real one), and the ``--tables-only`` path."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "frontier.py"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run: the script imports its sibling `_results_page`
    spec = importlib.util.spec_from_file_location("frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["frontier"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("frontier", None)
        sys.path.remove(str(SCRIPT.parent))


def parse(frontier, *argv, tmp_path=None):
    extra = ["--output-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")] if tmp_path else []
    args = frontier.build_parser().parse_args([*argv, *extra])
    args.recorded_command = "python scripts/frontier.py"  # what main() sets before rendering
    return args


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# ----------------------------------------------------------------------------------------------- commands, plan


def test_each_method_is_made_by_its_documented_commands(frontier, tmp_path):
    args = parse(frontier, "--mama-alpha", "0.3", "--join-start", "0.6", tmp_path=tmp_path)
    work = tmp_path / "work"

    assert frontier.commands(args, "dense", 0.0, 0) == ([], Path(frontier.MODEL))

    (oneshot,), folder = frontier.commands(args, "sparsegpt", 0.5, 0)
    assert folder == work / "oneshot-sparsegpt-500"
    assert oneshot[:4] == ["grpo-prune", "oneshot", frontier.MODEL, str(folder)]
    assert flag(oneshot, "--scorer") == "sparsegpt" and flag(oneshot, "--sparsity") == "0.5"

    # recipe: the one-shot model of the same sparsity (the same folder and command), then recovery with its masks.
    (first, train), folder = frontier.commands(args, "recipe", 0.5, 1)
    assert first == oneshot and folder == work / "recipe-50-s1"
    assert train[:4] == ["grpo-prune", "train", "--config", frontier.CONFIG]
    assert (
        flag(train, "--model_name_or_path") == flag(train, "--prune_init_masks") == str(work / "oneshot-sparsegpt-500")
    )
    assert flag(train, "--teacher_model_name_or_path") == frontier.MODEL
    assert flag(train, "--learning_rate") == frontier.RECOVER_LR == "3e-5"
    assert flag(train, "--output_dir") == str(folder) and flag(train, "--save_strategy") == "no"
    assert flag(train, "--prune_target_sparsity") == "0.5" and flag(train, "--seed") == "1"
    assert "--mama_alpha" not in train and "--prune_initial_sparsity" not in train

    # Pruning during training, from the dense model: wanda is MAMA with alpha 0.
    (wanda,), folder = frontier.commands(args, "wanda-trained", 0.4, 2)
    assert folder == work / "wanda-trained-40-s2" and flag(wanda, "--mama_alpha") == "0"
    assert "--model_name_or_path" not in wanda and "--prune_init_masks" not in wanda
    (mama,), _ = frontier.commands(args, "mama-trained", 0.4, 2)
    assert flag(mama, "--mama_alpha") == "0.3" and flag(mama, "--seed") == "2"
    # They differ only in alpha and output folder.
    assert [a for a in mama if a not in ("0.3", str(work / "mama-trained-40-s2"))] == [
        a for a in wanda if a not in ("0", str(work / "wanda-trained-40-s2"))
    ]

    # join: a one-shot start at join_start x target (0.6 x 0.5 = 0.3), then MAMA events up to the target.
    (start, join), folder = frontier.commands(args, "join", 0.5, 0)
    assert start == frontier.commands(args, "sparsegpt", 0.3, 0)[0][0]  # the sparsegpt point at 30%, reused
    assert flag(start, "--sparsity") == "0.3" and start[3] == str(work / "oneshot-sparsegpt-300")
    assert flag(join, "--model_name_or_path") == flag(join, "--prune_init_masks") == start[3]
    assert flag(join, "--prune_initial_sparsity") == "0.3" and flag(join, "--prune_target_sparsity") == "0.5"
    assert flag(join, "--mama_alpha") == "0.3" and flag(join, "--learning_rate") == "3e-5"

    with pytest.raises(ValueError, match="unknown method 'movement'"):
        frontier.commands(args, "movement", 0.5, 0)


def test_join_start_sparsity_is_rounded_into_a_stable_folder_name(frontier, tmp_path):
    args = parse(frontier, tmp_path=tmp_path)  # join_start 0.7: 0.7 x 0.6 is 0.41999999999999993 in floats
    (start, join), _ = frontier.commands(args, "join", 0.6, 0)
    assert flag(start, "--sparsity") == flag(join, "--prune_initial_sparsity") == "0.42"
    assert start[3].endswith("oneshot-sparsegpt-420")


def test_plan_runs_dense_first_then_each_sparsity_seed_by_seed_and_sparsegpt_once(frontier):
    args = parse(frontier, "--methods", "sparsegpt", "recipe", "--sparsities", "0.5", "0.3", "--seeds", "0", "1")
    assert frontier.plan(args) == [
        ("dense", 0.0, 0),
        ("sparsegpt", 0.5, 0),
        ("recipe", 0.5, 0),
        ("recipe", 0.5, 1),  # one-shot is deterministic: seed 0 only
        ("sparsegpt", 0.3, 0),
        ("recipe", 0.3, 0),
        ("recipe", 0.3, 1),
    ]
    args = parse(frontier, "--methods", "mama-trained", "wanda-trained", "--sparsities", "0.5", "--seeds", "0", "1")
    points = frontier.plan(args)
    # Seed by seed: an interrupted run leaves both methods with the same seeds.
    assert points[1:] == [
        ("mama-trained", 0.5, 0),
        ("wanda-trained", 0.5, 0),
        ("mama-trained", 0.5, 1),
        ("wanda-trained", 0.5, 1),
    ]
    assert [frontier.point_name(*p) for p in points[:2]] == ["dense", "mama-trained-50-s0"]


# -------------------------------------------------------------------------------------------------- headline

DENSE_ARITHMETIC = {"train": 0.4, "zero_shot": 0.3, "reworded": 0.2}


def record(method, target, seed, *, ppl=21.0, arithmetic=None, piqa=0.6, trained=True):
    """A point's record as run_point writes it (figures made up)."""
    steps = []
    if method in ("sparsegpt", "recipe", "join"):
        steps.append({"command": f"grpo-prune oneshot m /w/oneshot-{target}", "cpu_seconds": 30.0})
    if trained and method not in ("dense", "sparsegpt"):
        steps.append(
            {
                "command": f"grpo-prune train --seed {seed}",
                "cpu_seconds": 500.0,
                "steps": 16,
                "rollout_tokens": 6000,
                "frac_reward_zero_std": 0.25,
                "clipped_ratio": 0.125,
            }
        )
    trained_steps = [s for s in steps if s.get("steps")]
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "eval_settings": {
            "lambada": 12,
            "piqa": 150,
            "arithmetic_task": "arithmetic",
            "arithmetic": None,
            "wordings": ["train", "zero_shot", "reworded"],
        },  # fmt: skip
        "steps": steps,
        "ppl": ppl,
        "piqa": piqa,
        "arithmetic": dict(DENSE_ARITHMETIC if arithmetic is None else arithmetic),
        "arithmetic_n": 159,
        "arithmetic_samples": {},
        "sparsity": target * 0.98,
        "eval_cpu_seconds": 100.0,
        "device": "cpu (x86_64, 2 cores)",
        "date": "2026-12-06T10:00:00+00:00",
        "training_tokens": sum(s["rollout_tokens"] + 16 * 256 for s in trained_steps),
        "cpu_seconds": sum(s["cpu_seconds"] for s in steps),
        "training_cpu_seconds": sum(s["cpu_seconds"] for s in trained_steps),
    }


def scaled(fraction):
    return {w: fraction * a for w, a in DENSE_ARITHMETIC.items()}


@pytest.fixture
def dense():
    return record("dense", 0.0, 0, ppl=20.0, piqa=0.66)


def test_keeps_task_needs_every_wording_and_the_perplexity_bound(frontier, dense):
    keeps = lambda r: frontier.keeps_task(r, dense, 0.95, 1.25)  # noqa: E731
    assert keeps(record("recipe", 0.5, 0, ppl=21.0, arithmetic=scaled(0.96)))
    assert keeps(record("recipe", 0.5, 0, ppl=25.0, arithmetic=scaled(0.95)))  # both bounds are inclusive
    assert not keeps(record("recipe", 0.5, 0, ppl=25.2, arithmetic=scaled(1.2)))  # perplexity 1.26x
    one_wording_lost = {"train": 0.44, "zero_shot": 0.3, "reworded": 0.18}  # reworded at 90% of dense
    assert not keeps(record("recipe", 0.5, 0, arithmetic=one_wording_lost))
    assert frontier.kept(record("recipe", 0.5, 0, arithmetic=one_wording_lost), dense) == pytest.approx(
        {"train": 1.1, "zero_shot": 1.0, "reworded": 0.9}
    )
    assert not keeps(record("recipe", 0.5, 0, arithmetic={}))  # nothing measured is nothing kept


def test_headline_is_the_highest_kept_sparsity_per_seed_and_the_worst_over_seeds(frontier, dense):
    records = [
        record("recipe", 0.3, 0, arithmetic=scaled(1.0)),
        record("recipe", 0.5, 0, arithmetic=scaled(0.97)),
        record("recipe", 0.6, 0, arithmetic=scaled(0.5)),
        record("recipe", 0.3, 1, arithmetic=scaled(1.0)),
        record("recipe", 0.4, 1, arithmetic=scaled(0.99)),
        record("recipe", 0.5, 1, arithmetic=scaled(0.9)),
        record("sparsegpt", 0.3, 0, ppl=40.0),  # arithmetic kept, perplexity 2x: not kept
        record("join", 0.3, 0, arithmetic=scaled(1.0)),
        record("join", 0.3, 1, arithmetic=scaled(0.5)),
    ]
    head = frontier.headline(records, dense, 0.95, 1.25)
    assert list(head) == ["recipe", "sparsegpt", "join"]
    assert head["recipe"] == {"per_seed": {0: 0.5, 1: 0.4}, "worst": 0.4}
    assert head["sparsegpt"] == {"per_seed": {0: None}, "worst": None}
    assert head["join"] == {"per_seed": {0: 0.3, 1: None}, "worst": None}  # one seed kept nothing
    looser = frontier.headline(records, dense, 0.5, 2.0)
    assert looser["recipe"]["worst"] == 0.5 and looser["sparsegpt"]["worst"] == 0.3


# ---------------------------------------------------------------------------------------------------- tables


def records_by_name(frontier, *records):
    return {frontier.point_name(r["method"], r["target"], r["seed"]): r for r in records}


def test_render_tables_dense_row_points_and_headline(frontier, dense):
    args = parse(frontier, "--methods", "sparsegpt", "recipe", "--sparsities", "0.5", "0.6")
    records = records_by_name(
        frontier,
        dense,
        record("sparsegpt", 0.5, 0, ppl=30.0, arithmetic=scaled(0.5), trained=False),
        record("recipe", 0.5, 0, ppl=22.0, arithmetic=scaled(1.0)),
    )
    text, head = frontier.render(args, records)
    assert head == {
        "recipe": {"per_seed": {0: 0.5}, "worst": 0.5},
        "sparsegpt": {"per_seed": {0: None}, "worst": None},
    }
    assert text.startswith("# The sparsity-quality frontier\n")
    assert "`python scripts/frontier.py`" in text and "cpu (x86_64, 2 cores)" in text and "2026-12-06" in text
    # One standard error of the dense train-wording accuracy over 159 problems: sqrt(0.4 x 0.6 / 159) = 3.9 points.
    assert (
        "train 40.0%, zero_shot 30.0%, reworded 20.0% (159 problems; one standard error 3.9 points = 10% of dense"
        in text
    )
    assert "| recipe | 50% | seed 0: 50% |" in text and "| sparsegpt | none kept | seed 0: - |" in text
    assert "arithmetic % of dense (train / zero_shot / reworded)" in text
    assert "| dense | 0% | 0 | 0.000 | 20.00 | 1.00x | 100% | 100% / 100% / 100% | 0 | 0 | 0 | 100 | - | - |" in text
    assert "| sparsegpt | 50% | 0 | 0.490 | 30.00 | 1.50x | 91% | 50% / 50% / 50% | 0 | 0 | 30 | 100 | - | - |" in text
    assert (
        "| recipe | 50% | 0 | 0.490 | 22.00 | 1.10x | 91% | 100% / 100% / 100% | 10,096 | 500 | 530 | 100 | 0.250 | 0.125 |"
        in text
    )
    assert "Over seeds" not in text  # one seed: no seeds table
    assert "- recipe-50-s0: `grpo-prune train --seed 0`" in text
    assert "Planned but not measured: sparsegpt-60-s0, recipe-60-s0." in text


def test_render_adds_a_seeds_table_when_a_method_has_several_seeds(frontier, dense):
    args = parse(frontier, "--methods", "recipe", "--sparsities", "0.5", "--seeds", "0", "1")
    records = records_by_name(
        frontier,
        dense,
        record("recipe", 0.5, 0, ppl=22.0, arithmetic=scaled(1.0)),
        record("recipe", 0.5, 1, ppl=24.0, arithmetic=scaled(0.9)),
    )
    text, head = frontier.render(args, records)
    assert head["recipe"] == {"per_seed": {0: 0.5, 1: None}, "worst": None}
    assert "| recipe | none kept | seed 0: 50%, seed 1: - |" in text
    assert "Over seeds (mean ± standard deviation):" in text
    # ppl / dense 1.1 and 1.2; arithmetic 100% and 90% in every wording.
    assert "| recipe | 50% | 2 | 1.15x ± 0.07 | 91 ± 0% | 95 ± 7% / 95 ± 7% / 95 ± 7% |" in text
    assert "Planned but not measured" not in text


def test_render_a_wording_the_dense_model_never_answers(frontier):
    # Dense at 0% in one wording: no ratio there ("-"), in the point table and the seeds table alike.
    zero = {"train": 0.4, "question_only": 0.0}
    dense = record("dense", 0.0, 0, ppl=20.0, arithmetic=zero)
    args = parse(frontier, "--methods", "recipe", "--sparsities", "0.5", "--seeds", "0", "1")
    records = records_by_name(
        frontier,
        dense,
        record("recipe", 0.5, 0, arithmetic={"train": 0.4, "question_only": 0.1}),
        record("recipe", 0.5, 1, arithmetic={"train": 0.38, "question_only": 0.0}),
    )
    text, head = frontier.render(args, records)
    assert head["recipe"]["worst"] == 0.5  # judged on the wordings dense answers
    assert "| recipe | 50% | 0 | 0.490 | 21.00 | 1.05x | 100% | 100% / - |" in text
    assert "| recipe | 50% | 2 | 1.05x ± 0.00 | 100 ± 0% | 98 ± 4% / - |" in text


def test_render_without_a_dense_point_lists_what_is_planned(frontier):
    args = parse(frontier, "--methods", "sparsegpt", "--sparsities", "0.5")
    text, head = frontier.render(args, {})
    assert head == {} and "Headline" not in text
    assert "Planned but not measured: dense, sparsegpt-50-s0." in text


# ------------------------------------------------------------------------------------ commands and their logs

FAKE_GRPO_PRUNE = '''#!{python}
"""A stand-in for grpo-prune: records its arguments, makes the folders, and logs as TRL does."""
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["FAKE_GRPO_PRUNE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if os.environ.get("FAKE_GRPO_PRUNE_FAIL"):
    print("Traceback (most recent call last):\\nValueError: the fake failed", flush=True)
    sys.exit(3)
if argv[0] == "oneshot":
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_report.json").write_text("{{}}")  # every export has a report; a sliced one has no masks
elif argv[0] == "train":
    out = Path(argv[argv.index("--output_dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"")
    (out / "config.json").write_text("{{}}")
    print("  6%|6         | 1/16 [00:01<00:20]", flush=True)
    print("{{'loss': '1.1', 'num_tokens': '829', 'frac_reward_zero_std': '0.0', 'completions/clipped_ratio': '0.125'}}", flush=True)
    print("{{'loss': '0.9', 'grad_norm': '3.2', 'num_tokens': '1650', 'frac_reward_zero_std': '0.5', 'completions/clipped_ratio': '0.25'}}", flush=True)
    print("{{'loss': '0.7', 'num_tokens': '2480', 'frac_reward_zero_std': '1.0', 'completions/clipped_ratio': '0.0'}}", file=sys.stderr, flush=True)
    print("{{'train_runtime': '12.5', 'train_loss': '0.9', 'epoch': '1'}}", flush=True)
    summary = {{"reward_first": 0.25, "reward_last": 0.5, "sparsity_reached": 0.49}}
    (out / "run_summary.json").write_text(json.dumps(summary))
elif argv[0] == "soup":
    out = Path(argv[argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{{}}")
'''


@pytest.fixture
def fake_grpo_prune(tmp_path, monkeypatch):
    """A fake ``grpo-prune`` first on the PATH; returns a function that lists the argument lists it was called with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "grpo-prune"
    script.write_text(FAKE_GRPO_PRUNE.format(python=sys.executable))
    script.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GRPO_PRUNE_CALLS", str(calls))

    def called():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return called


def test_run_command_reads_trl_logs_and_the_run_summary(frontier, tmp_path, fake_grpo_prune):
    folder = tmp_path / "work" / "recipe-50-s0"
    command = frontier.train_command(folder, 0.5, 0, "--mama_alpha", "0")
    log = tmp_path / "train.log"
    result = frontier.run_command(command, log)
    assert fake_grpo_prune() == [command[1:]]
    assert result["command"] == " ".join(command)
    assert result["cpu_seconds"] > 0 and result["wall_seconds"] > 0  # the child's CPU time is counted
    assert result["steps"] == 3  # the three logged steps (one on stderr), not the end-of-training summary
    assert result["rollout_tokens"] == 2480  # TRL's num_tokens is cumulative: the last step's
    assert result["frac_reward_zero_std"] == 0.5 and result["clipped_ratio"] == 0.125  # medians over steps
    assert (result["reward_first"], result["reward_last"], result["sparsity_reached"]) == (0.25, 0.5, 0.49)
    assert "'loss': '1.1'" in log.read_text()

    oneshot = frontier.oneshot_command(tmp_path / "work" / "oneshot", 0.5)
    result = frontier.run_command(oneshot, tmp_path / "oneshot.log")
    assert set(result) == {"command", "cpu_seconds", "wall_seconds"}  # nothing to read from a one-shot log


def test_run_command_raises_with_the_log_tail_when_a_command_fails(frontier, tmp_path, fake_grpo_prune, monkeypatch):
    monkeypatch.setenv("FAKE_GRPO_PRUNE_FAIL", "1")
    command = frontier.oneshot_command(tmp_path / "oneshot", 0.5)
    with pytest.raises(RuntimeError, match=r"(?s)grpo-prune oneshot .* exited 3:.*ValueError: the fake failed"):
        frontier.run_command(command, tmp_path / "fail.log")


def test_main_makes_each_point_once_reuses_one_shot_models_and_resumes(
    frontier, tmp_path, fake_grpo_prune, monkeypatch
):
    evaluated = []

    def fake_evaluate(args, folder):
        evaluated.append(Path(folder))
        fraction = 1.0 if "recipe" in str(folder) else 0.5
        return {
            "ppl": 20.0 if folder == Path(frontier.MODEL) else 24.0,
            "piqa": 0.6,
            "arithmetic": {w: fraction * DENSE_ARITHMETIC[w] for w in args.wordings},
            "arithmetic_n": 159,
            "arithmetic_samples": {},
            "sparsity": 0.0 if folder == Path(frontier.MODEL) else 0.49,
            "eval_cpu_seconds": 1.0,
        }

    monkeypatch.setattr(frontier, "evaluate", fake_evaluate)
    monkeypatch.setattr(frontier.results_page, "device_name", lambda device="cpu": "cpu (test)")
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--output-dir", str(out), "--work-dir", str(work), "--methods", "sparsegpt", "recipe"]
    argv += ["--sparsities", "0.5", "--seeds", "0", "1"]
    assert frontier.main(argv) == 0

    calls = fake_grpo_prune()
    assert [c[0] for c in calls] == ["oneshot", "train", "train"]  # the one-shot model is made once
    assert evaluated == [
        Path(frontier.MODEL),
        work / "oneshot-sparsegpt-500",
        work / "recipe-50-s0",
        work / "recipe-50-s1",
    ]
    points = {p.stem: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    assert set(points) == {"dense", "sparsegpt-50-s0", "recipe-50-s0", "recipe-50-s1"}
    recipe = points["recipe-50-s0"]
    assert recipe["steps"][0]["reused"] is True and recipe["steps"][0]["cpu_seconds"] == 0.0
    assert recipe["training_tokens"] == 2480 + 3 * 2 * 128  # rollouts + the quickstart's distilled text windows
    assert recipe["training_cpu_seconds"] == recipe["cpu_seconds"] > 0
    assert points["sparsegpt-50-s0"]["training_tokens"] == 0 and points["sparsegpt-50-s0"]["cpu_seconds"] > 0
    assert not (work / "recipe-50-s0").exists() and (work / "oneshot-sparsegpt-500").is_dir()  # trained: removed
    page = (out / "frontier.md").read_text()
    assert "| recipe | 50% | seed 0: 50%, seed 1: 50% |" in page and "Over seeds" in page
    data = json.loads((out / "frontier.json").read_text())
    assert data["headline"]["recipe"]["worst"] == 0.5 and set(data["points"]) == set(points)
    assert data["command"].endswith("--sparsities 0.5 --seeds 0 1")
    assert (out / "frontier.png").is_file() == HAS_MATPLOTLIB

    # A rerun finds every point done: no command, no evaluation; the page stays.
    assert frontier.main(argv) == 0
    assert len(fake_grpo_prune()) == 3 and len(evaluated) == 4
    assert (out / "frontier.md").read_text() == page


def test_a_soup_point_measures_its_members_first_keeps_their_models_and_sums_their_cost(
    frontier, tmp_path, fake_grpo_prune, monkeypatch
):
    evaluated = []

    def fake_evaluate(args, folder):
        evaluated.append(Path(folder))
        return {
            "ppl": 24.0, "piqa": 0.6, "arithmetic": {w: 0.3 for w in args.wordings}, "arithmetic_n": 159,
            "arithmetic_samples": {}, "sparsity": 0.5, "eval_cpu_seconds": 1.0,
        }  # fmt: skip

    monkeypatch.setattr(frontier, "evaluate", fake_evaluate)
    monkeypatch.setattr(frontier.results_page, "device_name", lambda device="cpu": "cpu (test)")
    out, work = tmp_path / "out", tmp_path / "work"
    # A structured start (a sliced export: a report and no masks) is made once, as a masked one is.
    argv = ["--output-dir", str(out), "--work-dir", str(work), "--methods", "soup2-recipe-sparsegpt-mlp@8"]
    argv += ["--sparsities", "0.5"]
    assert frontier.main(argv) == 0
    calls = fake_grpo_prune()
    assert [c[0] for c in calls] == ["oneshot", "train", "train", "soup"]
    members = [work / "recipe-sparsegpt-mlp@8-50-s0", work / "recipe-sparsegpt-mlp@8-50-s1"]
    assert [c[c.index("--seed") + 1] for c in calls[1:3]] == ["0", "1"]
    assert calls[3] == ["soup", *map(str, members), "--output-dir", str(work / "soup2-recipe-sparsegpt-mlp@8-50-s0")]
    assert all((m / "config.json").is_file() for m in members)  # kept for the soup (and for larger soups)
    assert evaluated[1:] == [*members, work / "soup2-recipe-sparsegpt-mlp@8-50-s0"]
    points = {p.stem: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    soup = points["soup2-recipe-sparsegpt-mlp@8-50-s0"]
    assert soup["members"] == ["recipe-sparsegpt-mlp@8-50-s0", "recipe-sparsegpt-mlp@8-50-s1"]
    assert soup["training_tokens"] == sum(points[m]["training_tokens"] for m in soup["members"]) > 0
    assert soup["training_cpu_seconds"] == sum(points[m]["training_cpu_seconds"] for m in soup["members"])
    assert [s["command"].split()[1] for s in soup["steps"]] == ["oneshot", "train", "train", "soup"]
    assert "soup2-recipe-sparsegpt-mlp@8" in (out / "frontier.md").read_text()

    # A member whose point is recorded but whose model is gone cannot be averaged: a clear stop, nothing run.
    (out / "points" / "soup2-recipe-sparsegpt-mlp@8-50-s0.json").unlink()
    import shutil

    shutil.rmtree(members[1])
    with pytest.raises(SystemExit, match="recipe-sparsegpt-mlp@8-50-s1 was measured but its model"):
        frontier.main(argv)
    assert len(fake_grpo_prune()) == 4


def test_soup_methods_name_a_recipe_and_at_least_two_members(frontier):
    assert frontier.method_spec("soup4-recipe-cool@32") == "soup4-recipe-cool@32"
    assert frontier.soup_of("soup4-recipe-cool@32") == (4, "recipe-cool@32")
    for bad in ("soup1-recipe-cool", "soup2-sparsegpt", "soup2-quickstart", "soupx:recipe"):
        with pytest.raises(argparse.ArgumentTypeError):
            frontier.method_spec(bad)


def test_the_page_keeps_points_a_run_beside_this_one_adds(frontier, tmp_path, fake_grpo_prune, monkeypatch, dense):
    """Two runs side by side (one per core) share the points folder: the page each one writes lists the other's
    points too, including those that landed after it started."""
    out, work = tmp_path / "out", tmp_path / "work"
    (out / "points").mkdir(parents=True)
    (out / "points" / "dense.json").write_text(json.dumps(dense))

    def fake_evaluate(args, folder):  # the other run finishes its point while this one evaluates
        (out / "points" / "recipe-60-s0.json").write_text(json.dumps(record("recipe", 0.6, 0, ppl=30.0)))
        return {
            "ppl": 24.0,
            "piqa": 0.6,
            "arithmetic": dict(DENSE_ARITHMETIC),
            "arithmetic_n": 159,
            "arithmetic_samples": {},
            "sparsity": 0.49,
            "eval_cpu_seconds": 1.0,
        }

    monkeypatch.setattr(frontier, "evaluate", fake_evaluate)
    monkeypatch.setattr(frontier.results_page, "device_name", lambda device="cpu": "cpu (test)")
    argv = ["--output-dir", str(out), "--work-dir", str(work), "--methods", "recipe", "--sparsities", "0.5"]
    assert frontier.main(argv) == 0
    assert [c[0] for c in fake_grpo_prune()] == ["oneshot", "train"]  # only this run's point is made
    assert set(json.loads((out / "frontier.json").read_text())["points"]) == {"dense", "recipe-50-s0", "recipe-60-s0"}
    assert "| recipe | 60% | 0 |" in (out / "frontier.md").read_text()


def test_tables_only_rewrites_the_pages_from_the_points(frontier, tmp_path, dense, capsys):
    out = tmp_path / "out"
    (out / "points").mkdir(parents=True)
    records = records_by_name(
        frontier, dense, record("recipe", 0.5, 0, arithmetic=scaled(1.0)), record("recipe", 0.6, 0, ppl=30.0)
    )
    for name, r in records.items():
        (out / "points" / f"{name}.json").write_text(json.dumps(r))
    other = dict(record("recipe", 0.4, 0), eval_settings={**dense["eval_settings"], "piqa": 10})
    (out / "points" / "recipe-40-s0.json").write_text(json.dumps(other))
    (out / "frontier.json").write_text(json.dumps({"command": "OMP_NUM_THREADS=1 python scripts/frontier.py --x"}))

    argv = ["--output-dir", str(out), "--tables-only", "--methods", "recipe", "--sparsities", "0.5", "0.6"]
    assert frontier.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"[ignored] {out / 'points' / 'recipe-40-s0.json'}: measured with other evaluation settings" in printed
    page = (out / "frontier.md").read_text()
    assert page in printed and "| recipe | 50% | seed 0: 50% |" in page
    assert "`OMP_NUM_THREADS=1 python scripts/frontier.py --x`" in page  # the measuring command, kept
    assert "recipe | 40%" not in page and "Planned but not measured" not in page
    data = json.loads((out / "frontier.json").read_text())
    assert set(data["points"]) == {"dense", "recipe-50-s0", "recipe-60-s0"}
    assert data["headline"] == {"recipe": {"per_seed": {"0": 0.5}, "worst": 0.5}}
    assert data["command"] == "OMP_NUM_THREADS=1 python scripts/frontier.py --x"
    if HAS_MATPLOTLIB:
        assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "frontier.png").exists()


def test_every_method_is_accepted_with_and_without_steps_and_builds_its_commands(frontier, tmp_path):
    trained = [m for m in frontier.METHODS if m not in frontier.ONESHOT]
    args = parse(frontier, "--methods", *frontier.METHODS, *(f"{m}@32" for m in trained), tmp_path=tmp_path)
    for method in args.methods:
        cmds, folder = frontier.commands(args, method, 0.5, 0)
        train = [c for c in cmds if c[1] == "train"]
        assert bool(train) == (method.partition("@")[0] not in frontier.ONESHOT), method
        if "@" in method:
            assert train[-1][-2:] == ["--max_steps", "32"] and str(folder).endswith("recipe@32-50-s0") == (
                method == "recipe@32"
            )
        elif method == "quickstart":  # the shipped config as it is
            assert "--max_steps" not in train[-1]
        elif train:  # measured when the config ran 16 steps: pinned
            assert train[-1][-2:] == ["--max_steps", frontier.MEASURED_STEPS] and train[-1].count("--max_steps") == 1
    recipe_mixed = frontier.commands(args, "recipe-mixed", 0.5, 0)[0][1]
    assert recipe_mixed[recipe_mixed.index("--dataset_name") + 1] == "arithmetic"
    with pytest.raises(SystemExit):
        parse(frontier, "--methods", "sparsegpt@32")  # a one-shot method has no training steps


def test_every_training_command_is_a_valid_train_config(frontier, tmp_path, monkeypatch):
    """The printed `grpo-prune train` commands parse and validate as the CLI would (config + overrides), so a
    method cannot ship a flag combination the trainer refuses (e.g. `prune_init_masks` beside the quickstart's
    own one-shot start)."""
    import grpo_prune.export
    import grpo_prune.models
    from grpo_prune.cli import parse_train_args

    monkeypatch.chdir(SCRIPT.parents[1])  # the config path in the commands is relative to the checkout
    monkeypatch.setattr(grpo_prune.models, "validate_model_name_or_path", lambda name: None)  # not made here
    monkeypatch.setattr(
        grpo_prune.export, "masks_sidecar_granularity", lambda path: "n:m" if "-24-" in str(path) else "unstructured"
    )
    trained = [m for m in frontier.METHODS if m not in frontier.ONESHOT]
    args = parse(frontier, "--methods", *trained, tmp_path=tmp_path)
    for method in trained:
        smaller = frontier.physically_smaller(method)
        sparsity = frontier.fixed_sparsity(method) or (0.25 if smaller else 0.5)
        (train,) = [c for c in frontier.commands(args, method, sparsity, 0)[0] if c[1] == "train"]
        run = parse_train_args(train[2:])
        config = run.training
        if smaller:  # the physically smaller model is trained as it is: no masks, no pruning
            assert not config.pruning_enabled and config.prune_init_masks is None
        else:
            assert config.prune_target_sparsity == sparsity
        if method.startswith("recipe"):  # a recipe's own flags follow the shared recovery flags, so they win
            assert config.learning_rate == (1e-4 if method == "recipe-lr" else 3e-5), method
            assert config.prune_init_scorer is None and config.teacher_model_name_or_path == frontier.MODEL
        assert (config.prune_granularity == "n:m") == (method == "recipe-24"), method
        cool = "cool" in method or method == "gradual"  # recipe-cool, quickstart-cool, gradual
        assert config.temperature == (0.7 if cool else 1.0), method
        if method == "gradual":  # the config's own SparseGPT start at 80% of the target, then OBS events to it
            assert config.prune_init_sparsity == 0.4 and config.prune_init_scorer == "sparsegpt"
            assert (config.prune_scorer, config.prune_end_step, config.prune_every) == ("sparsegpt", 16, 8)
        assert config.per_device_train_batch_size == (16 if "wide" in method else 8), method
        assert config.max_steps == (24 if method == "quickstart" else 16), method  # the others as measured
        # Methods measured before the quickstart moved to the mixed prompts and `self` text pin the old data.
        old = method in ("recipe", "recipe-mixed", "join", "wanda-trained", "mama-trained", "mama-reward")
        assert (config.distill_dataset == "python_docs") == old, method
        assert (run.script.dataset_name == "arithmetic-easy") == (old and method != "recipe-mixed"), method
        if method in ("wanda-trained", "mama-trained", "mama-reward"):  # pruned during training from dense, at 1e-4
            assert config.prune_init_scorer is None and config.learning_rate == 1e-4, method


def test_fixed_pattern_methods_are_planned_at_their_own_sparsity_only(frontier, tmp_path):
    args = parse(
        frontier, "--methods", "sparsegpt-24", "recipe-24", "recipe", "--sparsities", "0.4", "0.5", tmp_path=tmp_path
    )
    assert frontier.plan(args) == [
        ("dense", 0.0, 0), ("recipe", 0.4, 0), ("sparsegpt-24", 0.5, 0), ("recipe-24", 0.5, 0), ("recipe", 0.5, 0)
    ]  # fmt: skip
    (oneshot,) = frontier.commands(args, "sparsegpt-24", 0.5, 0)[0]
    assert oneshot[oneshot.index("--granularity") + 1] == "n:m" and oneshot[oneshot.index("--n-m") + 1] == "2:4"


def test_text_tokens_follow_the_command_overrides(frontier):
    base = "grpo-prune train --config configs/quickstart.yaml"
    assert frontier.text_tokens(base, 16) == 16 * 2 * 128  # the config's 2 windows of 128 tokens a step
    assert frontier.text_tokens(f"{base} --distill_text_batch_size 8 --max_steps 32", 32) == 32 * 8 * 128
    assert frontier.text_tokens(f"{base} --distill_text_coef 0", 16) == 0
