"""Launched by test_fsdp2.py under `torchrun --nproc_per_node 2` (gloo, CPU): the sharded pruner under FSDP2.

For each case, one tiny Llama is `fully_shard`-ed (every decoder layer, then the root) and a plain copy is kept
unsharded. Each rank calibrates the sharded model on its own batch; the unsharded reference sees both ranks'
batches in rank order (the same activation statistics). Both are pruned; rank 0 writes the gathered sharded masks
and the reference masks. Then a few AdamW steps (weight decay on) with masks enforced, a save / rebuild / load of
the sharded pruner state, and an export of the gathered model through `export_pruned`.
"""

import functools
import json
import os
import sys
import zlib

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tiny import end_process_group, tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from grpo_prune.pruning.pruner import Pruner, PruningSettings
from grpo_prune.pruning.sharding import local
from grpo_prune.pruning.structure import decoder_layers

CASES = {
    # name: (PruningSettings fields, tiny model overrides, round weights to a grid (ties), sparsities in order)
    "wanda_layer": (dict(scorer="wanda"), dict(intermediate_size=67), False, [0.25, 0.5]),
    "mama_layer": (dict(scorer="mama", alpha=0.3), dict(intermediate_size=67), False, [0.5]),
    "mama_global": (dict(scorer="mama", alpha=0.3, comparison="global"), dict(intermediate_size=67), False, [0.5]),
    "magnitude_ties_layer": (dict(scorer="magnitude"), dict(intermediate_size=67), True, [0.3, 0.5]),
    "magnitude_ties_global": (dict(scorer="magnitude", comparison="global"), {}, True, [0.5]),
    "wanda_row": (dict(scorer="wanda", comparison="row"), {}, False, [0.5]),
    "random_layer": (dict(scorer="random"), {}, False, [0.5]),
    "wanda_2of4": (dict(scorer="wanda", granularity="n:m", n_m="2:4"), {}, False, [0.25, 0.5]),
    # |W0| read from the safetensors file the model was loaded from (each rank reads its own rows).
    "wanda_checkpoint": (dict(scorer="wanda"), dict(intermediate_size=67), False, [0.5]),
}
FROM_CHECKPOINT = {"wanda_checkpoint"}


def batches(world_size: int, vocab: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One calibration batch per rank: token ids ``[2, 12]`` and a left-padded attention mask."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(world_size):
        ids = torch.randint(3, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        out.append((ids, mask))
    return out


def build(overrides: dict, ties: bool) -> torch.nn.Module:
    model = tiny_model(**overrides)
    if ties:  # few distinct magnitudes: many exact ties, also across the shard boundary
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 20).round() / 20)
    return model


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for _, layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def synthetic_statistic(pruner: Pruner, name: str) -> torch.Tensor:
    """A deterministic reward statistic update for ``name``: full-size draws, sliced to the shard when sharded."""
    shape = tuple(pruner.targets[name].weight.shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    full = torch.randn(shape, generator=g)
    return full if pruner.layout is None else pruner.layout.local_rows(name, full)


def calibrate_and_prune(pruner: Pruner, model, data, sparsities: list[float]) -> None:
    pruner.attach_hooks()
    with torch.no_grad():
        for ids, mask in data:
            model(input_ids=ids, attention_mask=mask)
    pruner.remove_hooks()
    if pruner.indicators.tracks_statistic:
        for _ in range(pruner.settings.min_statistic_updates):
            pruner.accumulate_movement_({n: synthetic_statistic(pruner, n) for n in pruner.targets})
    for s in sparsities:
        pruner.prune_to(s)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(world)
    info: dict = {"world_size": world, "cases": {}}
    only = os.environ.get("FSDP2_CASES")  # comma-separated subset, for debugging
    for case, (fields, overrides, ties, sparsities) in CASES.items():
        if only and case not in only.split(","):
            continue
        settings = dict(target_sparsity=0.5, schedule="oneshot", **fields)
        from_file = case in FROM_CHECKPOINT
        if from_file:
            from transformers import AutoModelForCausalLM

            folder = f"{out}/{case}.checkpoint"
            if rank == 0:
                build(overrides, ties).save_pretrained(folder)
            dist.barrier()
            make = functools.partial(AutoModelForCausalLM.from_pretrained, folder)
        else:
            make = functools.partial(build, overrides, ties)

        reference = make()
        ref_pruner = Pruner(reference, PruningSettings(**settings), magnitude_from_checkpoint=from_file)
        calibrate_and_prune(ref_pruner, reference, data, sparsities)

        model = shard(make())
        pruner = Pruner(model, PruningSettings(**settings), magnitude_from_checkpoint=from_file)
        calibrate_and_prune(pruner, model, [data[rank]], sparsities)
        gathered = pruner.gathered_masks()
        local_bytes = pruner.memory_bytes()
        info["cases"][case] = {
            "sparsity": pruner.sparsity(),
            "ref_sparsity": ref_pruner.sparsity(),
            "local_mask_bytes": local_bytes["masks"],
            "ref_mask_bytes": ref_pruner.memory_bytes()["masks"],
            "magnitude_source": [pruner.indicators.magnitude_source, ref_pruner.indicators.magnitude_source],
        }
        if rank == 0:
            save_file({k: v.contiguous() for k, v in gathered.items()}, f"{out}/{case}.sharded.safetensors")
            save_file({k: v.contiguous() for k, v in ref_pruner.masks.items()}, f"{out}/{case}.ref.safetensors")

    # ---- training steps with masks enforced, on the last case's layer-wise wanda model
    settings = PruningSettings(target_sparsity=0.5, schedule="oneshot", scorer="wanda")
    model = shard(build({"intermediate_size": 67}, False))
    pruner = Pruner(model, settings)
    calibrate_and_prune(pruner, model, [data[rank]], [0.5])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    zero_before_reapply = True
    moved = 0
    kept_before = {n: local(m.weight).detach().clone() for n, m in pruner.targets.items()}
    for step in range(3):
        ids, mask = data[rank]
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        pruner.mask_gradients_()
        opt.step()
        if step == 0:
            pruner.mask_optimizer_state_(opt)  # state is created lazily by the first step
        for name, mod in pruner.targets.items():
            zero_before_reapply &= bool((local(mod.weight)[~pruner.masks[name]] == 0).all())
        pruner.apply_masks_()
        opt.zero_grad()
    for name, mod in pruner.targets.items():
        w = local(mod.weight).detach()
        moved += int((w[pruner.masks[name]] != kept_before[name][pruner.masks[name]]).sum())
    all_zero = all(bool((local(m.weight)[~pruner.masks[n]] == 0).all()) for n, m in pruner.targets.items())
    state_zero = True
    for name, mod in pruner.targets.items():
        for value in opt.state[mod.weight].values():
            if torch.is_tensor(value) and value.shape == mod.weight.shape:
                state_zero &= bool((local(value)[~pruner.masks[name]] == 0).all())
    info["train"] = {
        "zero_before_reapply": zero_before_reapply,
        "all_zero": all_zero,
        "optimizer_state_zero": state_zero,
        "kept_moved": moved,
        "sparsity": pruner.sparsity(),
    }

    # ---- save, rebuild, load
    pruner.save(f"{out}/state")
    dist.barrier()
    rebuilt = Pruner(shard(build({"intermediate_size": 67}, False)), settings)
    rebuilt.load(f"{out}/state")
    mine, theirs = pruner.state_dict(), rebuilt.state_dict()
    info["resume_identical"] = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    info["resume_sparsity"] = rebuilt.sparsity()

    # ---- export the gathered model
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full_masks = pruner.gathered_masks()
    sparsity = pruner.sparsity()  # collective: every rank
    probe = torch.tensor([[5, 9, 17, 33, 40, 41, 7, 3]])
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    if rank == 0:
        from grpo_prune.export import export_pruned
        from grpo_prune.pruning.oneshot import PruneReport

        plain = tiny_model(intermediate_size=67)
        plain.load_state_dict(full_state)
        report = PruneReport(
            layer_sparsity={},
            global_sparsity=sparsity,
            params_zeroed=0,
            params_total=0,
            target_sparsity=0.5,
            granularity="unstructured",
            n_m=None,
            scorer="wanda",
            masks=full_masks,
        )
        export_pruned(plain, f"{out}/export", pruner=report)
        save_file({"logits": logits.contiguous()}, f"{out}/fsdp_logits.safetensors")
    info["rank"] = rank
    with open(f"{out}/fsdp2_rank{rank}.json", "w") as f:
        json.dump(info, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
