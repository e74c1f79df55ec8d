"""`grpo-prune soup`: the average of models recovered from one pruned start keeps their mask exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import char_tokenizer, tiny_model, tiny_trainer
from transformers import AutoModelForCausalLM

from grpo_prune import prune_oneshot
from grpo_prune.cli import main
from grpo_prune.export import MASKS_FILE, REPORT_FILE, export_pruned, load_masks_sidecar
from grpo_prune.soup import average_models


def oneshot_start(folder, sparsity=0.5, **kw):
    """A one-shot prune of the tiny model, exported as a recovery's start: zeros and a mask sidecar, or sliced."""
    model = tiny_model()
    scorer = "wanda" if kw.get("granularity") == "structured" else "magnitude"  # structured scores need activations
    report = prune_oneshot(model, sparsity=sparsity, scorer=scorer, **kw)
    export_pruned(
        model, folder, pruner=report, structured=kw.get("granularity") == "structured", tokenizer=char_tokenizer()
    )
    return folder


def recover(tmp_path, start, seed):
    """A short recovery of ``start`` with its masks held, as `grpo-prune train --prune_init_masks` runs it."""
    model = AutoModelForCausalLM.from_pretrained(start)
    trainer = tiny_trainer(tmp_path / f"run{seed}", model=model, prune_init_masks=str(start), seed=seed, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / f"run{seed}"))
    return tmp_path / f"run{seed}"


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("soup")
    start = oneshot_start(tmp_path / "start")
    return start, [recover(tmp_path, start, seed) for seed in (1, 2)]


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_soup_is_the_mean_and_keeps_the_mask_exactly(recovered, tmp_path):
    start, runs = recovered
    a, b = weights(runs[0]), weights(runs[1])
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the seeds taught different things
    summary = average_models(runs, tmp_path / "soup")
    soup = weights(tmp_path / "soup")
    for name, tensor in soup.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-7, msg=name)
    masks = load_masks_sidecar(start)
    assert load_masks_sidecar(tmp_path / "soup").keys() == masks.keys()
    modules = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "soup").named_modules())
    for name, mask in masks.items():
        assert torch.equal(load_masks_sidecar(tmp_path / "soup")[name], mask)
        weight = modules[name].weight
        assert torch.all(weight[~mask] == 0) and torch.count_nonzero(weight) == mask.sum(), name
    assert summary["masked_modules"] == len(masks) > 0
    report = json.loads((tmp_path / "soup" / REPORT_FILE).read_text())
    assert report["soup"]["models"] == [str(r) for r in runs]
    # The soup is a pruned output like the runs': it exports, and the export reaches the same sparsity.
    exported = export_pruned(tmp_path / "soup", tmp_path / "export", structured=False)
    assert exported["global_sparsity"] == pytest.approx(0.5)
    assert (tmp_path / "soup" / "tokenizer.json").is_file()


def test_soup_of_physically_smaller_models_needs_no_masks(tmp_path):
    calibration = torch.randint(0, 60, (8, 16), generator=torch.Generator().manual_seed(1))
    start = oneshot_start(tmp_path / "start", 0.5, granularity="structured", calibration=calibration)
    assert not (start / MASKS_FILE).exists()
    other = tmp_path / "other"
    shutil.copytree(start, other)
    state = load_file(other / "model.safetensors")
    save_file({n: 3 * t for n, t in state.items()}, other / "model.safetensors", metadata={"format": "pt"})
    average_models([start, other], tmp_path / "soup")
    soup, first = weights(tmp_path / "soup"), weights(start)
    assert all(torch.allclose(soup[n], 2 * first[n]) for n in first)


def test_soup_refuses_models_with_different_masks(recovered, tmp_path):
    _, runs = recovered
    other = recover(tmp_path, oneshot_start(tmp_path / "start25", 0.25), seed=1)
    with pytest.raises(ValueError, match="prune different weights"):
        average_models([runs[0], other], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_soup_refuses_a_model_with_weights_where_its_mask_prunes(recovered, tmp_path):
    _, runs = recovered
    broken = tmp_path / "broken"
    shutil.copytree(runs[1], broken)
    state = load_file(broken / "model.safetensors")
    name = next(iter(load_masks_sidecar(broken)))
    state[f"{name}.weight"] = torch.ones_like(state[f"{name}.weight"])
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not zero where its mask prunes"):
        average_models([runs[0], broken], tmp_path / "soup")


@pytest.mark.parametrize(
    "case, match",
    [
        ("one", "at least two models"),
        ("twice", "given twice"),
        ("no_config", "no config.json"),
        ("output_is_a_model", "is one of the models"),
        ("output_not_a_soup", "not an earlier soup"),
        ("masks_in_one", "hold no pruning_masks"),
        ("adapters", "LoRA adapters"),
        ("compressed", "compressed export"),
    ],
)
def test_soup_refuses_bad_input_before_reading_weights(recovered, tmp_path, case, match):
    _, runs = recovered
    models, out = list(runs), tmp_path / "soup"
    if case == "one":
        models = runs[:1]
    elif case == "twice":
        models = [runs[0], runs[0]]
    elif case == "no_config":
        models = [runs[0], tmp_path]
    elif case == "output_is_a_model":
        out = runs[1]
    elif case == "output_not_a_soup":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "masks_in_one":
        bare = tmp_path / "bare"
        shutil.copytree(runs[1], bare)
        (bare / MASKS_FILE).unlink()
        models = [runs[0], bare]
    elif case == "adapters":
        lora = tmp_path / "lora"
        shutil.copytree(runs[1], lora)
        (lora / "adapter_config.json").write_text("{}")
        models = [runs[0], lora]
    elif case == "compressed":
        export_pruned(runs[1], tmp_path / "compressed", structured=False, compressed=True)
        models = [runs[0], tmp_path / "compressed"]
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=match):
        average_models(models, out)
    if case == "output_not_a_soup":
        assert (out / "notes.txt").read_text() == "mine"


def test_soup_command(recovered, tmp_path, capsys):
    _, runs = recovered
    assert main(["soup", *map(str, runs), "--output-dir", str(tmp_path / "soup")]) == 0
    assert "Averaged 2 models" in capsys.readouterr().out
    # An earlier soup is replaced; a single model is one usage line with exit status 2.
    assert main(["soup", *map(str, runs), "--output-dir", str(tmp_path / "soup")]) == 0
    assert main(["soup", str(runs[0]), "--output-dir", str(tmp_path / "soup")]) == 2
    assert "grpo-prune soup: error: a soup needs at least two models" in capsys.readouterr().err
