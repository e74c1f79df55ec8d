"""What a new user hits first: one-line CLI errors with the field they wrote, short help, model paths, dtype, names."""

import json

import pytest
import torch
import yaml
from tiny import char_tokenizer, tiny_model

import grpo_prune.models as models
from grpo_prune.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: every error below must come before one."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was validated")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "quickstart").mkdir(parents=True)
    return tmp_path


def config(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def run_cli(argv, capsys):
    """(exit status, stderr) of `grpo-prune ARGV`; SystemExit counts as a return."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


CASES = [
    # (YAML fields or None, extra argv, expected text on the error line)
    ({"prune_target_sparsity": 1.5}, [], "`prune_target_sparsity` must be a number in [0, 1), got 1.5"),
    ({"prune_n_m": "3:2", "prune_granularity": "n:m"}, [], "prune_n_m must be 'N:M'"),
    ({"mama_alpha": 2.0}, [], "`mama_alpha` must be a number in [0, 1]"),
    ({"prune_initial_sparsity": 0.9}, [], "`prune_initial_sparsity` must be in [0, prune_target_sparsity=0.5]"),
    ({"prune_target_sparsty": 0.5}, [], "unknown field `prune_target_sparsty` in"),
    ({"prune_target_sparsty": 0.5}, [], "did you mean `prune_target_sparsity`?"),
    (None, ["--prune_target_sparsty", "0.3"], "did you mean `--prune_target_sparsity`?"),
    (None, ["--max_steps", "abc"], "invalid int value: 'abc'"),
    (None, ["--prune_scorer", "best"], "invalid choice: 'best'"),
    (None, ["--dtype", "int8"], "invalid choice: 'int8'"),
    ({"model_name_or_path": "outputs/quickstrat"}, [], "did you mean 'outputs/quickstart'?"),
    ({"model_name_or_path": "./foo"}, [], "model path './foo' does not exist"),
    ({"use_peft": True}, [], "`use_peft: true` (LoRA) cannot be combined with pruning"),
]


@pytest.mark.parametrize("fields, extra, expected", CASES)
def test_train_errors_are_one_line_naming_the_users_field(workdir, capsys, no_model_loading, fields, extra, expected):
    argv = ["train"] + (["--config", config(workdir / "c.yaml", **fields)] if fields is not None else []) + extra
    status, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("grpo-prune")]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("grpo-prune train: error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err and "target_sparsity must" not in err.replace("prune_target_sparsity", "")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "--model", "outputs/quickstrat"], "did you mean 'outputs/quickstart'?"),
        (["eval", "--model", "~/no-such-model"], "does not exist"),
        (["eval", "--model", "smollm2-135m-instruct", "--limt", "3"], "did you mean `--limit`?"),
        (["eval", "--model", "smollm2-135m-instruct", "--tasks", "piqa", "wikitext"], "unknown task(s) 'wikitext'"),
        (["export", "no-such-checkpoint", "out"], "no-such-checkpoint"),
        (["export", "only-one-arg"], "required"),
        (["trian"], "did you mean `train`?"),
    ],
)
def test_eval_export_errors_share_the_format(workdir, capsys, no_model_loading, argv, expected):
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"grpo-prune {argv[0]}: error: " if argv[0] != "trian" else "grpo-prune: error: ")
    assert expected in err and "Traceback" not in err


def test_debug_shows_the_traceback(workdir, no_model_loading):
    path = config(workdir / "c.yaml", prune_target_sparsity=1.5)
    with pytest.raises(ValueError, match="prune_target_sparsity"):
        main(["--debug", "train", "--config", path])


def test_train_help_lists_this_projects_options_first(capsys):
    assert main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    head = "\n".join(short.splitlines()[:40])
    assert "--config" in head and "--prune_target_sparsity" in head and "--help-all" in head
    assert "--distill_coef" in short and "--model_name_or_path" in short and "--dtype" in short
    assert "--learning_rate" not in short  # TRL's fields are behind --help-all
    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert "--learning_rate" in full and "--num_generations" in full
    assert full.index("--prune_target_sparsity") < full.index("--learning_rate")


# ------------------------------------------------------------------------------------------------ model paths


@pytest.mark.parametrize(
    "name, local",
    [
        ("outputs/quickstrat", True),  # hub shape, but ./outputs exists: a typo of a local folder
        ("./foo", True),
        ("../foo", True),
        ("/abs/foo", True),
        ("~/foo", True),
        ("a/b/c", True),
        ("foo/", True),
        ("HuggingFaceTB/SmolLM2-135M", False),
        ("gpt2", False),
    ],
)
def test_local_path_rule(workdir, name, local):
    assert models._looks_like_local_path(name) is local


def test_hub_id_fails_at_once_when_offline_or_unreachable(workdir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(models, "_hub_cached", lambda repo: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelNotAvailableError, match="HF_HUB_OFFLINE is set"):
        models.validate_model_name_or_path("someorg/somemodel")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(models.ModelNotAvailableError, match="hub cannot be reached"):
        models.validate_model_name_or_path("someorg/somemodel")
    # Cached but unreachable: use the cache at once rather than retrying the hub for ~50 s.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_cached", lambda repo: True)
    assert models.validate_model_name_or_path("someorg/somemodel") == "hub"
    assert constants.HF_HUB_OFFLINE is True


# ------------------------------------------------------------------------------------------------ dtype and names


def test_dtype_auto_is_fp32_on_cpu_bf16_on_a_bf16_accelerator(monkeypatch):
    assert models.resolve_dtype("auto", use_cpu=True) == torch.float32
    assert models.resolve_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(models, "bf16_supported", lambda use_cpu=False: not use_cpu)
    assert models.resolve_dtype("auto") == torch.bfloat16
    assert models.resolve_dtype(None, use_cpu=True) == torch.float32
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        models.resolve_dtype("int8")


def test_train_dtype_defaults_to_auto(workdir):
    from grpo_prune.cli import parse_train_args

    model_dir = workdir / "tiny"
    tiny_model().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    run = parse_train_args(["--model_name_or_path", str(model_dir), "--report_to", "none"])
    assert run.model.dtype == "auto"


def test_loaded_model_names_the_base_model(workdir, monkeypatch):
    model_dir = workdir / "tiny"
    model = tiny_model()
    model.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what the GGUF conversion carries
    model.save_pretrained(model_dir)
    loaded = models.load_model(str(model_dir))
    assert loaded.config._name_or_path == str(model_dir)
    assert not hasattr(loaded.config, "_model_name_or_path")
    # An embedded model is named by its embedded name, not by its cache folder.
    monkeypatch.setitem(models.EMBEDDED_MODELS, "tiny-embedded", models.EMBEDDED_MODELS[models.DEFAULT_MODEL])
    monkeypatch.setattr(models, "resolve_model_path", lambda name: str(model_dir))
    loaded = models.load_model("tiny-embedded")
    assert loaded.config._name_or_path == "tiny-embedded"
    loaded.save_pretrained(workdir / "saved")
    saved = json.loads((workdir / "saved" / "config.json").read_text())
    assert "_model_name_or_path" not in saved


def test_model_card_names_the_base_model_and_the_output(workdir):
    from tiny import tiny_trainer

    model_dir = workdir / "outputs" / "quickstart"
    tiny_model().save_pretrained(model_dir)
    trainer = tiny_trainer(workdir / "run", model=models.load_model(str(model_dir)))
    trainer.create_model_card(model_name="run")
    card = (workdir / "run" / "README.md").read_text()
    assert "None" not in card
    assert f"`{model_dir}` (local folder)" in card
    assert f"model={str((workdir / 'run').resolve())!r}" in card or f"model={str(workdir / 'run')!r}" in card


def test_settings_to_config_names_real_fields():
    import dataclasses

    from grpo_prune.config import SETTINGS_TO_CONFIG, MamaGRPOConfig, config_field_names
    from grpo_prune.pruning.pruner import PruningSettings

    settings = {f.name for f in dataclasses.fields(PruningSettings)}
    config_fields = {f.name for f in dataclasses.fields(MamaGRPOConfig)}
    for internal, name in SETTINGS_TO_CONFIG.items():
        if internal in settings:
            assert name in config_fields, name
    assert config_field_names("`every` must be >= 1, got 0.") == "`prune_every` must be >= 1, got 0."
    assert config_field_names("keep every other `seed`") == "keep every other `seed`"  # plain words stay
