"""Calibration and distillation sources: built-in text, the model's own samples (self-generated, cached), mix."""

from __future__ import annotations

import json

import pytest
import torch

from grpo_prune import data
from grpo_prune.data import (
    CALIBRATION_SOURCES,
    calibration_windows,
    model_fingerprint,
    self_generated_samples,
    text_token_stream,
    validate_calibration_source,
    validate_text_source,
)
from tests.tiny import char_tokenizer, tiny_model


@pytest.fixture
def small_recipe(monkeypatch):
    """Short samples so that a tiny model generates several batches quickly."""
    monkeypatch.setattr(data, "SELF_MAX_NEW_TOKENS", {"task": 6, "open": 10})
    monkeypatch.setattr(data, "SELF_BATCH_SIZE", {"task": 4, "open": 4})


class CountingGenerate:
    """Wraps ``model.generate`` to count its calls."""

    def __init__(self, model):
        self.calls = 0
        self.inner = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("source", ["self", "self:task", "self:open", "mix", "python_docs"])
def test_windows_have_the_asked_shape_and_valid_ids(source, small_recipe, tmp_path):
    tok = char_tokenizer()
    model = tiny_model()
    out = calibration_windows(tok, source, 5, 32, model=model, cache_dir=tmp_path)
    assert out.shape == (5, 32) and out.dtype == torch.long
    assert 0 <= int(out.min()) and int(out.max()) < model.config.vocab_size


def test_self_generated_is_deterministic_given_the_seed(small_recipe, tmp_path):
    tok, model = char_tokenizer(), tiny_model()
    # self:open: the samples are mostly sampled tokens (a task prompt alone fills many windows here).
    a = calibration_windows(tok, "self:open", 4, 24, model=model, seed=3, cache_dir=tmp_path / "a")
    torch.manual_seed(123)  # the caller's global RNG state must not matter
    b = calibration_windows(tok, "self:open", 4, 24, model=model, seed=3, cache_dir=tmp_path / "b")
    c = calibration_windows(tok, "self:open", 4, 24, model=model, seed=4, cache_dir=tmp_path / "c")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_second_call_reads_the_cache_and_does_not_generate(small_recipe, tmp_path):
    tok, model = char_tokenizer(), tiny_model()
    counter = CountingGenerate(model)
    first = calibration_windows(tok, "self:task", 3, 16, model=model, cache_dir=tmp_path)
    assert counter.calls > 0
    calls = counter.calls
    again = calibration_windows(tok, "self:task", 3, 16, model=model, cache_dir=tmp_path)
    assert counter.calls == calls
    assert torch.equal(first, again)
    # A larger request generates only the missing batches, and the smaller one is its prefix.
    more = self_generated_samples(model, tok, "task", 3000, cache_dir=tmp_path)
    assert counter.calls > calls
    fewer = self_generated_samples(model, tok, "task", 48, cache_dir=tmp_path)
    assert more[: len(fewer)] == fewer
    (cache_file,) = tmp_path.glob("task-*.json")
    assert json.loads(cache_file.read_text())["tokens"] >= 3000


def test_the_cache_is_keyed_by_the_model(small_recipe, tmp_path):
    tok = char_tokenizer()
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    assert model_fingerprint(a) == model_fingerprint(tiny_model(seed=0))
    assert model_fingerprint(a) != model_fingerprint(b)
    other = tiny_model(seed=0, rope_theta=1234.0)  # same weights, another function: another key
    assert model_fingerprint(other) != model_fingerprint(a)
    runtime = tiny_model(seed=0)
    runtime.config.use_cache = False  # what a trainer does to its model: samples are still shared with `oneshot`
    assert model_fingerprint(runtime) == model_fingerprint(a)
    calibration_windows(tok, "self:open", 2, 16, model=a, cache_dir=tmp_path)
    counter = CountingGenerate(b)
    calibration_windows(tok, "self:open", 2, 16, model=b, cache_dir=tmp_path)
    assert counter.calls > 0
    assert len(list(tmp_path.glob("open-*.json"))) == 2


def test_task_samples_start_with_the_task_prompt_and_open_samples_with_an_opening(small_recipe, tmp_path):
    tok, model = char_tokenizer(), tiny_model()
    (task,) = self_generated_samples(model, tok, "task", 1, cache_dir=tmp_path)[:1]
    first_prompt = data.load_prompt_dataset("arithmetic", "train", seed=0)[0]["prompt"]
    asked = tok.apply_chat_template(first_prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert task[: len(asked)] == list(asked)
    (opening,) = self_generated_samples(model, tok, "open", 1, cache_dir=tmp_path)[:1]
    first = tok.decode(tok(data.NEUTRAL_OPENINGS[0], add_special_tokens=False)["input_ids"])
    assert tok.decode(opening).startswith(first)


def test_mix_is_half_text_half_self(small_recipe, tmp_path):
    tok, model = char_tokenizer(), tiny_model()
    mix = calibration_windows(tok, "mix", 4, 16, model=model, cache_dir=tmp_path)
    docs = calibration_windows(tok, "python_docs", 2, 16)
    own = calibration_windows(tok, "self", 2, 16, model=model, cache_dir=tmp_path)
    assert torch.equal(mix[:2], docs) and torch.equal(mix[2:], own)


@pytest.mark.parametrize("task_share", [0.5, 0.875, 0.25])
def test_task_share_sets_the_share_of_task_tokens(task_share, monkeypatch):
    """``self`` holds ``task_share`` of its tokens from task samples; 0.5 alternates them one to one, as before."""
    tok = char_tokenizer()
    token = {"task": 1, "open": 2}

    def fake_samples(model, tokenizer, kind, num_tokens, **kwargs):
        return [[token[kind]] * 100 for _ in range(-(-num_tokens // 100))]

    monkeypatch.setattr(data, "self_generated_samples", fake_samples)
    stream = data.self_generated_stream(None, tok, "self", 20_000, task_share=task_share)[:20_000]
    task, open_ = stream.count(1), stream.count(2)
    assert task / (task + open_) == pytest.approx(task_share, abs=0.01)
    if task_share == 0.5:  # rows alternate: task, open, task, ...
        firsts = [t for t in stream if t in (1, 2)][::100][:6]
        assert firsts == [1, 2, 1, 2, 1, 2]
    for share, source in ((1.0, "self:task"), (0.0, "self:open")):
        assert data.self_generated_stream(None, tok, "self", 500, task_share=share) == data.self_generated_stream(
            None, tok, source, 500
        )


def test_task_share_is_refused_where_it_cannot_apply():
    data.validate_task_share(0.875, "self")
    data.validate_task_share(0.875, "mix")
    data.validate_task_share(0.5, "python_docs")  # the default is fine anywhere
    for share in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match=r"a number in \[0, 1\]"):
            data.validate_task_share(share, "self")
    for source in ("self:task", "self:open", "python_docs"):
        with pytest.raises(ValueError, match="needs the calibration 'self'"):
            data.validate_task_share(0.75, source)
    with pytest.raises(ValueError, match="needs the calibration 'self'"):
        calibration_windows(char_tokenizer(), "python_docs", 2, 16, task_share=0.75)


def test_bad_sources_fail_before_any_model_is_needed(tmp_path):
    with pytest.raises(ValueError, match="Unknown calibration source 'wikipedia'.*python_docs, self"):
        validate_calibration_source("wikipedia")
    for source in CALIBRATION_SOURCES:
        validate_calibration_source(source)
    with pytest.raises(ValueError, match="pass model="):
        calibration_windows(char_tokenizer(), "self", 2, 16)
    with pytest.raises(ValueError, match="Unknown calibration source"):
        calibration_windows(char_tokenizer(), "selff", 2, 16, model=tiny_model())


def test_distill_dataset_self_is_the_teachers_samples(small_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "self_generated_cache_dir", lambda: tmp_path)
    assert validate_text_source("self") == "self"
    tok, teacher = char_tokenizer(), tiny_model()
    stream = text_token_stream(tok, "self", model=teacher, num_tokens=200)
    assert len(stream) >= 200
    assert stream == text_token_stream(tok, "self", model=teacher, num_tokens=200)  # cached, same
    assert stream[:50] == data.self_generated_stream(teacher, tok, "self", 200, cache_dir=tmp_path)[:50]
    with pytest.raises(ValueError, match="pass model="):
        text_token_stream(tok, "self")


def test_oneshot_command_calibrates_on_the_models_own_samples(tmp_path, small_recipe, monkeypatch, capsys):
    from grpo_prune.cli import main

    monkeypatch.setenv("GRPO_PRUNE_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny-model"
    tiny_model().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    argv = ["--scorer", "wanda", "--calibration", "mix", "--calibration-windows", "4", "--calibration-length", "32"]
    assert main(["oneshot", str(model_dir), str(tmp_path / "out"), *argv]) == 0
    assert "4 x 32 tokens of mix" in capsys.readouterr().out
    # The samples were generated from the dense model and cached where the cache root says.
    assert list((tmp_path / "cache" / "self_generated").glob("task-*.json"))
    assert list((tmp_path / "cache" / "self_generated").glob("open-*.json"))


def test_oneshot_command_refuses_an_unknown_source_before_loading(tmp_path, capsys):
    from grpo_prune.cli import main

    try:
        code = main(["oneshot", str(tmp_path / "no-such-model"), str(tmp_path / "out"), "--calibration", "selfish"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Unknown calibration source 'selfish'" in err and "mix" in err
    # The default source samples the model on a task's prompts: an unknown task is refused before loading too.
    code = main(["oneshot", str(tmp_path / "no-such-model"), str(tmp_path / "out"), "--calibration-task", "nosuch"])
    assert code == 2 and "Unknown dataset 'nosuch'" in capsys.readouterr().err
    bad_share = ["--calibration", "python_docs", "--calibration-task-share", "0.75"]
    code = main(["oneshot", str(tmp_path / "no-such-model"), str(tmp_path / "out"), *bad_share])
    assert code == 2 and "`--calibration-task-share`: a task share other than 0.5" in capsys.readouterr().err


def test_prune_oneshot_points_a_source_name_to_calibration_windows():
    from grpo_prune import prune_oneshot

    with pytest.raises(ValueError, match="calibration_windows"):
        prune_oneshot(tiny_model(), 0.5, scorer="wanda", calibration="mix")


# ------------------------------------------------------------------------------------- per-layer allocation (OWL)
def _layer_scores(outliers: list[int], sizes=((8, 16), (4, 24))) -> dict[str, torch.Tensor]:
    """Scores of decoder layers with two targets of different sizes; layer i gets ``outliers[i]`` entries 50x the
    rest (which are uniform in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(0)
    scores = {}
    for i, count in enumerate(outliers):
        for j, shape in enumerate(sizes):
            t = 0.5 + torch.rand(shape, generator=gen)
            if j == 0:
                t.view(-1)[:count] = 50.0
            scores[f"model.layers.{i}.proj{j}"] = t
    return scores


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.37])
def test_owl_keeps_the_exact_global_count_and_prunes_outlier_layers_less(sparsity):
    from grpo_prune.pruning.masks import num_to_prune, owl_sparsities, unstructured_mask

    scores = _layer_scores([0, 2, 6, 12])
    layer = owl_sparsities(scores, sparsity, lam=0.08, m=5.0)
    total = sum(t.numel() for t in scores.values())
    masks = {n: unstructured_mask(t, layer[n]) for n, t in scores.items()}
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == num_to_prune(sparsity, total)
    per_layer = [
        sum(int((~masks[n]).sum()) for n in scores if n.startswith(f"model.layers.{i}."))
        / sum(scores[n].numel() for n in scores if n.startswith(f"model.layers.{i}."))
        for i in range(4)
    ]
    # More outliers, lower sparsity; every layer within lambda of the target (plus a rounding unit).
    assert per_layer[0] > per_layer[1] > per_layer[2] > per_layer[3]
    assert max(abs(s - sparsity) for s in per_layer) <= 0.08 + 1 / 32
    assert max(per_layer) - min(per_layer) > 0.1
    # The two targets of one layer share its sparsity (up to rounding).
    assert abs(layer["model.layers.3.proj0"] - layer["model.layers.3.proj1"]) < 1 / 64


def test_owl_is_uniform_when_layers_have_equal_outliers_and_respects_previous_masks():
    from grpo_prune.pruning.masks import owl_sparsities, unstructured_mask

    same = owl_sparsities(_layer_scores([3, 3, 3]), 0.5)
    assert all(abs(s - 0.5) < 1 / 64 for s in same.values())
    scores = _layer_scores([0, 2, 6, 12])
    # Layer 3 (the most outliers) was already pruned to 55%: it stays so, the others make room.
    prev = {n: torch.ones_like(t, dtype=torch.bool) for n, t in scores.items()}
    for n in ("model.layers.3.proj0", "model.layers.3.proj1"):
        prev[n].view(-1)[: int(0.55 * prev[n].numel())] = False
    layer = owl_sparsities(scores, 0.5, prev_masks=prev)
    masks = {n: unstructured_mask(t, layer[n], prev[n]) for n, t in scores.items()}
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(t.numel() for t in scores.values()))
    assert not any(bool((masks[n] & ~prev[n]).any()) for n in scores)  # monotone: pruned stays pruned
    assert abs(layer["model.layers.0.proj0"] - 0.5) > 0.01  # the others still differ by their outliers


def test_prune_oneshot_with_owl_allocation(tmp_path):
    from grpo_prune import prune_oneshot

    model = tiny_model()
    with torch.no_grad():  # give layer 0's inputs outliers: a few huge embedding dimensions
        model.model.embed_tokens.weight[:, :2] *= 40.0
    ids = torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(0))
    uniform = prune_oneshot(tiny_model(), 0.5, scorer="wanda", calibration=ids)
    owl = prune_oneshot(model, 0.5, scorer="wanda", calibration=ids, allocation="owl", owl_lambda=0.1)
    assert owl.params_zeroed == uniform.params_zeroed == round(0.5 * owl.params_total)
    assert len({round(s, 3) for s in uniform.layer_sparsity.values()}) == 1
    assert len({round(s, 3) for s in owl.layer_sparsity.values()}) > 1
    assert all(abs(s - 0.5) <= 0.1 + 1e-3 for s in owl.layer_sparsity.values())
    with pytest.raises(ValueError, match="allocation"):
        prune_oneshot(tiny_model(), 0.5, scorer="mama", calibration=ids, allocation="owl")
    with pytest.raises(ValueError, match="allocation"):
        prune_oneshot(tiny_model(), 0.5, scorer="wanda", calibration=ids, allocation="outliers")


# ------------------------------------------------------------------------------------- scripts/measure_calibration.py
def _measure_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "measure_calibration.py"
    spec = importlib.util.spec_from_file_location("measure_calibration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_calibration_plan_resume_and_tables(tmp_path):
    mc = _measure_script()
    args = mc.build_parser().parse_args(["--output-dir", str(tmp_path), "--windows", "8", "32", "128", "384"])
    names = [mc.point_name(p) for p in mc.plan_points(args)]
    # Dense first, the default scorer's larger size and sources before the other scorer's, the costliest last.
    assert names[:3] == ["dense", "sparsegpt-python_docs-8x256", "wanda-python_docs-8x256"]
    assert names.index("sparsegpt-mix-32x256") < names.index("wanda-python_docs-128x256")
    assert names[-2:] == ["sparsegpt-python_docs-384x256", "wanda-python_docs-384x256"]
    assert len(names) == len(set(names))

    def record(point, ppl, acc):
        return {
            "settings": mc.settings_of(args, point),
            "calibration_tokens": point["windows"] * point["length"],
            "ppl": ppl,
            "arithmetic": acc,
            "arithmetic_n": 159,
            "cpu_seconds": {"load": 1.0, "prune": 10.0 + point["windows"], "eval": 50.0},
            "wall_seconds": 120.0,
            "device": "CPU (test)",
            "date": "2026-12-06 07:00 UTC",
        }

    points = {mc.point_name(p): p for p in mc.plan_points(args)}
    records = {
        "dense": record(points["dense"], 40.0, 0.4),
        "sparsegpt-python_docs-8x256": record(points["sparsegpt-python_docs-8x256"], 120.0, 0.1),
        "sparsegpt-mix-32x256": record(points["sparsegpt-mix-32x256"], 80.0, 0.2),
    }
    path = mc.point_path(args, points["sparsegpt-mix-32x256"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records["sparsegpt-mix-32x256"]))
    assert mc.load_point(args, points["sparsegpt-mix-32x256"]) == records["sparsegpt-mix-32x256"]
    other = mc.build_parser().parse_args(["--output-dir", str(tmp_path), "--lambada", "4"])
    assert mc.load_point(other, points["sparsegpt-mix-32x256"]) is None  # other settings: not reused
    # The estimate follows the finished points of the scorer (a line through them) and the eval time.
    done = list(records.values())
    assert mc.estimate_cpu(done, points["sparsegpt-python_docs-128x256"]) > mc.estimate_cpu(
        done, points["sparsegpt-python_docs-32x256"]
    )
    text = mc.write_tables(args, records, "python scripts/measure_calibration.py")
    assert "| sparsegpt | python_docs | 8 x 256 | 2,048 | 120.00 | 3.00x | 10.0 | 25% |" in text
    assert "| sparsegpt | mix | 32 x 256 | 8,192 | 80.00 | 2.00x | 20.0 | 50% |" in text
    assert "- **command**: `python scripts/measure_calibration.py`" in text
    assert "Not measured" in text and "wanda-python_docs-384x256" in text
    assert json.loads((tmp_path / "calibration.json").read_text())["points"]["dense"]["ppl"] == 40.0


def test_sampling_uses_the_kv_cache_even_when_a_trainer_turned_it_off(small_recipe, tmp_path):
    """A trainer sets `config.use_cache = False`; sampling the teacher (or the student before a one-shot start) with
    that config recomputed the whole prefix every token (~7x slower on a CPU for SmolLM2-135M)."""
    tok, model = char_tokenizer(), tiny_model()
    model.config.use_cache = False
    model.generation_config.use_cache = False
    seen = []
    inner = model.generate
    model.generate = lambda *args, **kwargs: seen.append(kwargs.get("use_cache")) or inner(*args, **kwargs)
    self_generated_samples(model, tok, "open", 40, cache_dir=tmp_path)
    assert seen and all(flag is True for flag in seen)


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_warper_keeps_the_tokens_transformers_top_p_keeps(top_p):
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    # Peaked rows (the nucleus lies within the 8 candidates) and flat ones (it does not: the full-rank fallback).
    scores = torch.cat([torch.randn(6, 200) * 4, torch.randn(6, 200) * 0.1])
    ours = data.NucleusWarper(top_p, candidates=8)(None, scores.clone())
    theirs = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], scores[~torch.isinf(ours)])  # kept logits are untouched
    kept = (~torch.isinf(ours)).sum(-1)
    assert int(kept.min()) <= 8 < int(kept.max())  # both paths ran: the candidates, and the full rank
    assert torch.equal(data.NucleusWarper(1.0)(None, scores), scores)
    with pytest.raises(ValueError, match="top_p"):
        data.NucleusWarper(0.0)


def test_sampling_cuts_the_nucleus_and_ignores_a_top_p_in_the_models_generation_config(small_recipe, tmp_path):
    tok, model = char_tokenizer(), tiny_model()
    model.generation_config.top_p = 0.01  # would leave only the argmax if transformers applied it
    seen = []
    warper_call = data.NucleusWarper.__call__

    def spy(self, input_ids, scores):
        out = warper_call(self, input_ids, scores)
        seen.append(int((~torch.isinf(out)).sum(-1).min()))
        return out

    data.NucleusWarper.__call__ = spy
    try:
        samples = self_generated_samples(model, tok, "open", 40, cache_dir=tmp_path)
    finally:
        data.NucleusWarper.__call__ = warper_call
    assert samples and seen  # the warper cut every step, and rows kept more than the argmax
    assert max(seen) > 1


def test_samples_equal_those_of_transformers_top_p_at_the_same_seed(small_recipe):
    """The warper changes the cost of a step, not the samples: the same batch and seed with transformers' own top-p
    warper gives the same tokens (checked on the embedded model too: the quickstart's task samples of seeds 0-2 were
    identical before and after the switch)."""
    from transformers import TopPLogitsWarper

    from grpo_prune.evaluation.batching import pad_id

    tok, model = char_tokenizer(), tiny_model()
    model.eval()
    prompts = data._self_prompts(tok, "open", "arithmetic", 0)[:4]
    pad = pad_id(tok, tok.eos_token_id)
    top_p = data.SELF_SAMPLING["top_p"]
    ours = data._generate_batch(model, prompts, 24, pad, seed=5)
    theirs = data._generate_batch(model, prompts, 24, pad, seed=5, nucleus=TopPLogitsWarper(top_p))
    few = data._generate_batch(model, prompts, 24, pad, seed=5, nucleus=data.NucleusWarper(top_p, candidates=4))
    other_seed = data._generate_batch(model, prompts, 24, pad, seed=6)
    assert ours == theirs == few  # `few`: the tiny vocabulary (64) is smaller than the default candidates
    assert ours != other_seed  # the comparison can fail: the samples depend on the draw
