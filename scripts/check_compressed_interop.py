"""Do other tools read grpo-prune's compressed exports? Decompresses them with compressed-tensors' own sparse
compressors, the code llm-compressor and vLLM use for these formats.

compressed-tensors dropped its sparse compressors after 0.14 (grpo-prune depends on a newer release for the
bit packing and config schema only), so this script fetches compressed-tensors 0.14.0.1 from the package index
into a temporary folder (``pip download --no-deps``; no model hub), exports a tiny random Llama pruned 50%
unstructured and 2:4 with ``export_pruned(..., compressed=True)``, and in a separate process with that release on
``sys.path`` decompresses each with ``ModelCompressor.from_pretrained(folder).sparsity_compressor.decompress`` given
the weight file (``model-sparse.safetensors``: the export names it so that plain ``from_pretrained`` refuses the
folder; compressed-tensors reads a folder's ``model.safetensors`` but takes any file by path), comparing every weight
with the masked model's, bit for bit. Prints a table; exits 1 on any difference.

    python scripts/check_compressed_interop.py [--compressed-tensors-dir DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

RELEASE = "compressed-tensors==0.14.0.1"

CHECK = r"""
import json, os, sys, torch
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import load_file
folder, ref = sys.argv[1], sys.argv[2]
compressor = ModelCompressor.from_pretrained(folder).sparsity_compressor
dense = dict(compressor.decompress(os.path.join(folder, "model-sparse.safetensors")))
ref = load_file(ref)
found = [k for k in ref if k in dense]
print(json.dumps({
    "version": compressed_tensors.__version__,
    "compressor": type(compressor).__name__,
    "targets": len(ref),
    "found": len(found),
    "differing": [k for k in found if not torch.equal(dense[k].to(ref[k].dtype), ref[k])],
}))
"""


def fetch(dest: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", RELEASE, "-d", dest], check=True)
    (wheel,) = glob.glob(os.path.join(dest, "compressed_tensors-*.whl"))
    target = os.path.join(dest, "site")
    zipfile.ZipFile(wheel).extractall(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed-tensors-dir", help=f"an unpacked {RELEASE} (default: fetch it)")
    args = parser.parse_args(argv)

    import json

    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tiny import char_tokenizer, tiny_model

    from grpo_prune import prune_oneshot
    from grpo_prune.export import export_pruned

    rows = []
    with tempfile.TemporaryDirectory(prefix="ct-interop-") as tmp:
        site = args.compressed_tensors_dir or fetch(tmp)
        for granularity in ("unstructured", "n:m"):
            model = tiny_model()
            report = prune_oneshot(model, sparsity=0.5, granularity=granularity, scorer="magnitude")
            folder = os.path.join(tmp, granularity.replace(":", ""))
            exported = export_pruned(
                model, folder, pruner=report, structured=False, tokenizer=char_tokenizer(), compressed=True
            )
            ref = os.path.join(tmp, f"{granularity.replace(':', '')}-ref.safetensors")
            save_file(
                {f"{n}.weight": m.weight.detach().contiguous() for n, m in model.named_modules() if n in report.masks},
                ref,
            )
            env = {**os.environ, "PYTHONPATH": site}
            out = subprocess.run(
                [sys.executable, "-c", CHECK, folder, ref], env=env, capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((granularity, exported["weights_format"], result))
    print("\n| export | format | read by | pruned weights found | differing from the masked model |")
    print("|---|---|---|---:|---:|")
    ok = True
    for granularity, fmt, r in rows:
        ok &= not r["differing"] and r["found"] == r["targets"]
        print(
            f"| {granularity} | {fmt} | compressed-tensors {r['version']} {r['compressor']} | "
            f"{r['found']} of {r['targets']} | {len(r['differing'])} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
