"""The real entry point (`grpo-prune train --config ...`) on a tiny model, the shipped configs, and W&B offline."""

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from grpo_prune.cli import main, parse_train_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.yaml")))


def write_config(tmp_path, model_dir, **overrides):
    config = {
        "model_name_or_path": str(model_dir),
        "dataset_name": "arithmetic",
        "reward_funcs": ["math_answer", "tests_rewards:distinct_chars"],
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "activation_checkpointing": False,
        "prune_target_sparsity": 0.5,
        "prune_end_step": 2,
        "prune_every": 1,
        "distill_coef": 1.0,
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def user_reward_module(tmp_path, monkeypatch):
    # A user's own reward, referenced from YAML as "module:function" (varies, so advantages are not all zero).
    (tmp_path / "tests_rewards.py").write_text(
        "def distinct_chars(prompts, completions, **kwargs):\n"
        "    return [len(set(c if isinstance(c, str) else c[-1]['content'])) / 10 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_train_cli_end_to_end(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, reward_window=1)  # reward_after known one batch after an event
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_prune.cli", "train", "--config", str(config), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "run"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["sparsity_reached"] == pytest.approx(0.5)
    assert summary["params_nonzero_after"] < summary["params_nonzero_before"]
    assert summary["reward_first"] is not None
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.5)
    assert report["distillation"]["enabled"] is True
    assert (out / "model.safetensors").exists() and (out / "pruning_events.jsonl").exists()
    assert "grpo-prune: run finished" in proc.stdout and "sparsity" in proc.stdout
    # The events file holds the report's records, reward_after included once known.
    events = [json.loads(line) for line in (out / "pruning_events.jsonl").read_text().splitlines()]
    assert events == report["events"] and all("reward_after" in e for e in events)
    assert any(e["reward_after"] is not None for e in events[:-1]) or len(events) == 1
    # Two counts, both named: masked entries (= the report's) and the fall in non-zero parameters.
    assert summary["params_pruned"] == report["params_pruned"]
    assert summary["params_zeroed"] == summary["params_nonzero_before"] - summary["params_nonzero_after"]
    assert summary["params_zeroed"] <= summary["params_pruned"]
    # Whether GRPO had a gradient, from TRL's own metrics (the tiny reward varies, so groups teach).
    assert 0.0 <= summary["frac_reward_zero_std_median"] < 1.0
    assert 0.0 <= summary["clipped_ratio_median"] <= 1.0
    assert "frac_reward_zero_std median" in proc.stdout
    # Readable by other users like any file written with open() (umask 022 in the test environment).
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("model.safetensors", "pruning_report.json", "run_summary.json", "pruning_masks.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert "is_gradient_checkpointing" not in proc.stderr


def test_train_cli_under_torchrun_two_ranks(tmp_path, tiny_model_dir):
    # The command a DDP user runs: both ranks exit 0 once training is over (the run ends its process group; left to
    # interpreter exit, gloo once aborted a finished rank) and rank 0 alone prints and writes the summary.
    config = write_config(tmp_path, tiny_model_dir, prune_scorer="wanda", distill_coef=0.0, use_cpu=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*launch, "-m", "grpo_prune.cli", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("grpo-prune: run finished") == 1  # rank 0 alone reports
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["sparsity_reached"] == pytest.approx(0.5)
    assert "terminate called" not in proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ({"dataset_name": "no-such-data"}, "Unknown dataset"),
        ({"reward_funcs": ["no_such_reward"]}, "no_such_reward"),
        ({"reward_funcs": ["tests_rewards:missing"]}, "missing"),
        ({"prune_granularity": "blocks"}, "granularity"),
        ({"prune_n_m": "3:2"}, "n_m"),
        ({"model_name_or_path": "./no/such/model"}, "does not exist"),
        ({"use_peft": True}, "LoRA"),
        ({"distill_dataset": "no/such/text.txt"}, "distill_dataset"),
    ],
)
def test_bad_config_fails_before_loading(tmp_path, tiny_model_dir, override, message, monkeypatch):
    import grpo_prune.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(grpo_prune.models, "load_model", no_loading)
    config = write_config(tmp_path, tiny_model_dir, **override)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_train_args(["--config", str(config)])


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).name for c in CONFIGS])
def test_shipped_configs_validate(config):
    import yaml

    from grpo_prune.models import EMBEDDED_MODELS

    model = yaml.safe_load(Path(config).read_text()).get("model_name_or_path")
    if model in EMBEDDED_MODELS and model != "smollm2-135m-instruct":  # optional wheels (the default is installed)
        try:
            EMBEDDED_MODELS[model].check_installed()
        except FileNotFoundError:
            pytest.skip(f"{Path(config).name} needs {EMBEDDED_MODELS[model].install_hint}")
    run = parse_train_args(["--config", config])
    assert run.reward_funcs
    assert run.training.output_dir


def test_help_and_unknown_command(capsys):
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["fly"]) == 2
    assert capsys.readouterr().err.startswith("grpo-prune: error: unknown command 'fly'")


def test_wandb_offline_run_has_pruning_metrics(tmp_path, tiny_model_dir, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_config(tmp_path, tiny_model_dir, report_to="wandb", run_name="tiny")
    run = parse_train_args(["--config", str(config)])
    from grpo_prune.cli import run_train

    run_train(run)
    wandb.finish()
    # wandb-core writes the file in a separate process; the file and its last records can land just after
    # finish() returns, so read it until the final summary is there (a chunk still being written is skipped).
    deadline = time.time() + 60
    while True:
        files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
        history_keys, config_keys, summary_keys = scan_keys(files[0], wandb_internal_pb2) if files else (set(),) * 3
        if "prune/final_sparsity" in summary_keys or time.time() > deadline:
            break
        time.sleep(1)
    assert len(files) == 1
    for key in (
        "train/prune/sparsity",
        "train/prune/target_sparsity",
        "train/distill/loss",
        "train/reward",
        "prune/layer_sparsity",
        "prune/score_histogram",
    ):
        # Tables and histograms are stored as nested keys (key/_type, key/values, ...).
        assert any(k == key or k.startswith(key + "/") for k in history_keys), key
    assert {"prune_target_sparsity", "prune_scorer", "mama_alpha", "distill_coef"} <= config_keys
    assert "prune/final_sparsity" in summary_keys, sorted(k for k in summary_keys if "prune" in k or "exit" in k)


def scan_keys(path, pb2):
    """History, config and summary keys recorded in a `.wandb` file (nested keys joined with '/')."""
    history_keys, config_keys, summary_keys = set(), set(), set()
    for data in read_wandb_records(path):
        record = pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history_keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "config":
            config_keys.update(item.key for item in record.config.update)
        elif kind == "summary":
            summary_keys.update(item.key or "/".join(item.nested_key) for item in record.summary.update)
    return history_keys, config_keys, summary_keys


def read_wandb_records(path):
    """Payloads of a `.wandb` file: a 7-byte header, then LevelDB-style chunks in 32 KiB blocks (wandb's format;
    wandb 0.31 ships no Python reader). Chunk header: crc32 (4 bytes), length (2, little endian), type (1):
    1 full, 2 first, 3 middle, 4 last."""
    import struct
    import zlib

    raw = Path(path).read_bytes()
    if len(raw) < 7:  # the writer has not written the header yet
        return
    assert raw[:4] == b":W&B", raw[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if pos + 7 + length > len(raw):  # the writer is still appending this chunk
            return
        payload = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, "corrupt .wandb chunk"
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "accelerate" / "*.yaml"))))
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    assert config.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP")
    if config.distributed_type == "FSDP":  # the pruner follows FSDP2's DTensor shards; it refuses FSDP1
        assert config.fsdp_config["fsdp_version"] == 2
    assert config.num_processes >= 2


def test_lora_with_distillation_and_text_runs_from_yaml(tmp_path, tiny_model_dir):
    """LoRA + distillation with no teacher path (the base with adapters disabled is the teacher) + text KD."""
    from grpo_prune.cli import run_train

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}."}) + "\n" for i in range(100)))
    config = write_config(
        tmp_path,
        tiny_model_dir,
        max_steps=2,
        prune_target_sparsity=0.0,
        use_peft=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        distill_dataset=str(text),
        distill_text_length=16,
        distill_hidden_coef=1.0,
    )
    summary = run_train(parse_train_args(["--config", str(config)]))
    assert summary["steps"] == 2


# ------------------------------------------------------------------------------------------------ oneshot
def test_oneshot_command_prunes_exports_and_feeds_prune_init_masks(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog 12 + 7 = 19. " * 40)
    out = tmp_path / "sparsegpt-50"
    code = main(
        [
            "oneshot",
            str(tiny_model_dir),
            str(out),
            "--scorer",
            "sparsegpt",
            "--calibration",
            str(text),
            "--calibration-windows",
            "4",
            "--calibration-length",
            "32",
        ]
    )
    assert code == 0 and "prune_init_masks" in capsys.readouterr().out
    masks = load_file(out / "pruning_masks.safetensors")
    assert sum(int((~m.bool()).sum()) for m in masks.values()) == sum(m.numel() for m in masks.values()) // 2
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["pruning"]["scorer"] == "sparsegpt"
    # The recipe's second half: train the export with its own masks held, the dense model as teacher.
    config = write_config(
        tmp_path, out, prune_init_masks=str(out), teacher_model_name_or_path=str(tiny_model_dir), max_steps=2
    )
    assert main(["train", "--config", str(config)]) == 0
    trained = load_file(tmp_path / "run" / "pruning_masks.safetensors")
    assert all(torch.equal(trained[n].bool(), m.bool()) for n, m in masks.items())


def test_oneshot_command_sparsegpt_mlp_neurons_exports_a_smaller_model(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoConfig

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog 12 + 7 = 19. " * 40)
    out = tmp_path / "sparsegpt-mlp-25"
    argv = ["oneshot", str(tiny_model_dir), str(out), "--scorer", "sparsegpt", "--granularity", "structured"]
    assert main([*argv, "--sparsity", "0.25", "--calibration", str(text), "--calibration-windows", "4"]) == 0
    printed = capsys.readouterr().out
    assert "exported structured" in printed and "prune_target_sparsity: 0" in printed
    dense = AutoConfig.from_pretrained(tiny_model_dir).intermediate_size
    assert AutoConfig.from_pretrained(out).intermediate_size == dense - round(0.25 * dense)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["pruning"]["scorer"] == "sparsegpt"


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--calibration", "nowhere.txt"], "neither a built-in text"),
        (["--sparsity", "1.5"], "target_sparsity"),
        (["--scorer", "obs"], "invalid choice"),
    ],
)
def test_oneshot_command_refuses_bad_input_before_loading(tmp_path, capsys, argv, match):
    try:
        code = main(["oneshot", str(tmp_path / "no-such-model"), str(tmp_path / "out"), *argv])
    except SystemExit as exit_:  # argparse's own errors (one line, status 2)
        code = exit_.code
    assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_error_during_training_shows_its_traceback_not_a_usage_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    # A ValueError raised mid-training (a Gram matrix not positive definite, NaN scores) is not a usage mistake: it
    # propagates with its traceback (Python's exit status 1) instead of becoming one line with status 2.
    from grpo_prune.cli import TrainingError
    from grpo_prune.pruning.pruner import Pruner

    original = Pruner.maybe_prune

    def failing(self, step):
        if step >= 2:
            raise ValueError("the Gram matrix of model.layers.0.mlp.down_proj is not positive definite")
        return original(self, step)

    monkeypatch.setattr(Pruner, "maybe_prune", failing)
    config = write_config(tmp_path, tiny_model_dir, max_steps=3, prune_end_step=3, distill_coef=0.0)
    with pytest.raises(TrainingError, match="step 2.*not positive definite") as info:
        main(["train", "--config", str(config)])
    assert isinstance(info.value.__cause__, ValueError)
    assert "error:" not in capsys.readouterr().err  # no one-line usage message
