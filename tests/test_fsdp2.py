"""The sharded pruner under FSDP2 (`fully_shard`), run as 2 processes with `torchrun` on gloo/CPU.

`fsdp2_prune.py` does the work on each rank (see its docstring); this file launches it once (module fixture) and
checks what it wrote: masks equal to one process's for every selection, pruned weights and Adam moments exactly zero
through AdamW steps with weight decay, an exact resume of the per-rank state, and a vanilla export whose logits equal
the sharded model's. Accelerate's FSDP plugin does not engage on CPU, so the trainer's FSDP2 path runs here only
for its teacher (`fsdp2_teacher.py`: the teacher sharded as a run shards it, one process on gloo).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model

from grpo_prune.pruning.pruner import Pruner, PruningSettings
from grpo_prune.pruning.sharding import order_keys

HERE = os.path.dirname(__file__)
CASES = (
    "wanda_layer",
    "mama_layer",
    "mama_global",
    "magnitude_ties_layer",
    "magnitude_ties_global",
    "wanda_row",
    "random_layer",
    "wanda_2of4",
    "wanda_checkpoint",
)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    repo = os.path.dirname(HERE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, HERE])}
    env.pop("FSDP2_CASES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, os.path.join(HERE, "fsdp2_prune.py"), str(out)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((out / f"fsdp2_rank{r}.json").read_text()) for r in (0, 1)]
    return out, infos


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_masks_equal_one_process(fsdp2_run, case):
    out, infos = fsdp2_run
    sharded = load_file(out / f"{case}.sharded.safetensors")
    reference = load_file(out / f"{case}.ref.safetensors")
    assert sharded.keys() == reference.keys() and reference
    for name, mask in reference.items():
        assert torch.equal(sharded[name], mask), f"{case}: {name} differs in {(sharded[name] != mask).sum()} entries"
    total = sum(m.numel() for m in reference.values())
    assert sum(int((~m).sum()) for m in reference.values()) == round(0.5 * total)
    for info in infos:  # figures are of the whole model on every rank; masks are held per shard
        assert info["cases"][case]["sparsity"] == pytest.approx(info["cases"][case]["ref_sparsity"])
        assert info["cases"][case]["local_mask_bytes"] < 0.6 * info["cases"][case]["ref_mask_bytes"]
        sharded_source, ref_source = info["cases"][case]["magnitude_source"]
        assert sharded_source == ref_source and (sharded_source == "checkpoint") is (case == "wanda_checkpoint")


@pytest.mark.slow
def test_sharded_training_keeps_pruned_weights_zero(fsdp2_run):
    _, infos = fsdp2_run
    for info in infos:
        train = info["train"]
        # Masked gradients + masked Adam moments: zero even before the weights are re-masked after the step.
        assert train["zero_before_reapply"] and train["all_zero"] and train["optimizer_state_zero"]
        assert train["kept_moved"] > 0  # the kept weights did train
        assert train["sparsity"] == 0.5


@pytest.mark.slow
def test_sharded_state_resumes_exactly_and_refuses_another_world_size(fsdp2_run):
    out, infos = fsdp2_run
    assert all(info["resume_identical"] and info["resume_sparsity"] == 0.5 for info in infos)
    state = out / "state"
    assert sorted(p.name for p in state.iterdir()) == [
        "pruner_state.json",
        "pruner_state.rank0-of-2.safetensors",
        "pruner_state.rank1-of-2.safetensors",
    ]
    assert json.loads((state / "pruner_state.json").read_text())["world_size"] == 2
    unsharded = Pruner(tiny_model(intermediate_size=67), PruningSettings(scorer="wanda", schedule="oneshot"))
    with pytest.raises(ValueError, match="sharded by FSDP2 over 2 ranks.*unsharded"):
        unsharded.load(state)


@pytest.mark.slow
def test_gathered_model_exports_as_vanilla_checkpoint(fsdp2_run):
    from transformers import AutoModelForCausalLM

    out, _ = fsdp2_run
    exported = AutoModelForCausalLM.from_pretrained(out / "export")
    masks = load_file(out / "export" / "pruning_masks.safetensors")
    modules = dict(exported.named_modules())
    for name, keep in masks.items():
        assert (modules[name].weight[~keep] == 0).all(), name
    probe = torch.tensor([[5, 9, 17, 33, 40, 41, 7, 3]])
    with torch.no_grad():
        logits = exported(input_ids=probe).logits
    torch.testing.assert_close(logits, load_file(out / "fsdp_logits.safetensors")["logits"])


def test_order_keys_follow_float_order():
    values = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    keys = order_keys(values)
    assert keys[3] == keys[4]  # -0.0 == +0.0, as float comparison and the one-process selection see them
    distinct = torch.cat([keys[:4], keys[5:]])
    assert torch.equal(distinct, torch.sort(distinct).values) and distinct.unique().numel() == distinct.numel()
    perm = torch.randperm(1000)
    x = torch.randn(1000)[perm]
    assert torch.equal(torch.argsort(order_keys(x), stable=True), torch.argsort(x, stable=True))


def test_unsharded_pruner_has_no_layout():
    pruner = Pruner(tiny_model(), PruningSettings(scorer="magnitude"))
    assert pruner.layout is None
    assert pruner.state_file() == "pruner_state.safetensors"


def _fake_trainer(fsdp_version: int):
    from types import SimpleNamespace

    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))


@pytest.mark.parametrize(
    "version, fields, error, match",
    [
        (1, {}, NotImplementedError, "fsdp_version: 2"),
        (2, {"prune_granularity": "structured"}, ValueError, "`granularity`='structured'"),
        (2, {"prune_compensate": True}, ValueError, "`compensate`=True"),
        (2, {"mama_alpha": 0.5, "mama_normalization": "zscore"}, ValueError, "`normalization`='zscore'"),
        (2, {"mama_alpha": 0.5, "distill_coef": 1.0}, ValueError, "distill_coef"),
    ],
)
def test_trainer_refuses_what_fsdp2_pruning_cannot_do(tmp_path, version, fields, error, match):
    from tiny import tiny_args

    from grpo_prune import MamaGRPOTrainer

    args = tiny_args(tmp_path, **fields)
    with pytest.raises(error, match=match):
        MamaGRPOTrainer._check_fsdp2(_fake_trainer(version), args)


def test_trainer_accepts_the_shipped_fsdp2_settings(tmp_path):
    from tiny import tiny_args

    from grpo_prune import MamaGRPOTrainer

    MamaGRPOTrainer._check_fsdp2(_fake_trainer(2), tiny_args(tmp_path, distill_coef=1.0))  # mama_alpha 0: fine


def test_trainer_distils_from_an_fsdp2_sharded_teacher(tmp_path):
    """FSDP2 with distillation (configs/multi_gpu_fsdp2.yaml): the sharded teacher is called through its root, so
    FSDP2 gathers its shards; the losses and the trained weights equal those of a plain teacher."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the number {i} is {i % 7} more than {i - i % 7}." for i in range(100)))
    repo = os.path.dirname(HERE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, HERE])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    proc = subprocess.run(
        [*cmd, os.path.join(HERE, "fsdp2_teacher.py"), str(tmp_path), str(text)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp2_teacher.json").read_text())
    for key, values in result["plain"].items():
        assert len(values) == 2, key
    assert result["plain"]["distill/loss"][-1] > 0  # pruned away from the teacher: a real comparison
    for wrap in ("layers",):
        for key, values in result["plain"].items():
            assert result[wrap][key] == pytest.approx(values, rel=1e-5, abs=1e-7), (wrap, key)
        assert result[f"{wrap}_weights_equal"] and result[f"{wrap}_sparsity"] == pytest.approx(0.5), wrap
