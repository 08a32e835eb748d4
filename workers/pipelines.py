"""Checkpoint sources: where a model alias's pipeline comes from, and what it can make.

- ``builtin://digits-dit`` / ``digits-flux`` / ``digits-flux-shifted``: the built-in digits models (16x16).
- a local diffusers directory (``/path`` or ``file:///path``).
- ``hf://org/name`` at the alias's revision, from the local Hugging Face cache only (never
  the hub); a missing snapshot is a :class:`~registry.errors.NotFound` naming the revision.

Only :func:`load_pipeline` imports torch/diffusers (it runs inside a worker).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from registry.errors import InvalidInput, NotFound
from registry.matching import ModelInfo, Resolution

BUILTIN_PREFIX = "builtin://"
BUILTIN_RESOLUTION = Resolution(width=16, height=16)
CLASS_PIPELINES = ("DiTPipeline", "DigitsFluxPipeline")


def builtin_name(source: str) -> str | None:
    """``digits-dit`` for ``builtin://digits-dit``; None for other sources."""
    return source[len(BUILTIN_PREFIX) :] if source.startswith(BUILTIN_PREFIX) else None


def is_class_conditional(model: ModelInfo) -> bool:
    """Whether calls take class labels (DiT, the digits models) rather than prompts."""
    if builtin_name(model.source) is not None:
        return True
    return (model.pipeline or ("DiTPipeline" if model.arch == "dit" else "")) in CLASS_PIPELINES


def is_local(source: str) -> bool:
    """Whether ``source`` evidently names a local folder: ``file://``, an absolute, ``~`` or
    ``./`` path, or a path that exists (a bare ``org/name`` may be meant for the hub)."""
    if source.startswith("file://"):
        return True
    if builtin_name(source) is not None or source.startswith("hf://"):
        return False
    path = Path(source).expanduser()
    return path.is_absolute() or source.startswith(("./", "../")) or path.exists()


def checkpoint_path(source: str, revision: str | None) -> Path | None:
    """The local directory of a checkpoint (None for built-in models)."""
    name = builtin_name(source)
    if name is not None:
        from invardiff.models import BUILTIN_MODELS

        if name not in BUILTIN_MODELS:
            raise NotFound(f"unknown built-in model {source} (known: {', '.join(BUILTIN_MODELS)})")
        return None
    if source.startswith("hf://"):
        return _hf_snapshot(source.removeprefix("hf://"), revision)
    path = Path(source.removeprefix("file://")).expanduser()
    if not (path / "model_index.json").is_file():
        raise InvalidInput(f"{source} is not a diffusers pipeline directory (no model_index.json)")
    return path


def _hf_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at huggingface_hub's import
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
        )
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError):
        raise NotFound(
            f"no snapshot of {repo_id} at revision {revision or 'main'} in the local Hugging "
            "Face cache (offline): download it on this host first"
        ) from None


def _config(path: Path, component: str) -> dict[str, Any]:
    try:
        return json.loads((path / component / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def check_resolution(model: ModelInfo, resolution: Resolution) -> None:
    """Refuse a resolution the checkpoint cannot generate (read from its configs, no weights)."""
    if builtin_name(model.source) is not None:
        checkpoint_path(model.source, model.revision)  # unknown built-in -> NotFound
        if resolution != BUILTIN_RESOLUTION:
            raise InvalidInput(
                f"model {model.name} only makes {BUILTIN_RESOLUTION} images, not {resolution}"
            )
        return
    path = checkpoint_path(model.source, model.revision)
    assert path is not None
    blocks = _config(path, "vae").get("block_out_channels") or [0, 0, 0, 0]
    scale = 2 ** (len(blocks) - 1)
    if model.arch == "dit":
        size = _config(path, "transformer").get("sample_size")
        if size is not None and resolution != Resolution(size * scale, size * scale):
            raise InvalidInput(
                f"model {model.name} makes {size * scale}x{size * scale} images, not {resolution}"
            )
        return
    for side in (resolution.width, resolution.height):
        if side % (2 * scale):
            raise InvalidInput(
                f"model {model.name} needs width and height divisible by {2 * scale}, not {resolution}"
            )


WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
_PIPELINE_MODULES = ("diffusers", "invardiff.models")  # where a pipeline class may come from


def pipeline_class(name: str):
    """The pipeline class ``model_index.json`` names: diffusers', or an invardiff built-in's
    (``DigitsFluxPipeline``, which ``save_pretrained`` records without its module)."""
    import importlib

    from diffusers import DiffusionPipeline

    for module in _PIPELINE_MODULES:
        found = getattr(importlib.import_module(module), name, None)
        if isinstance(found, type) and issubclass(found, DiffusionPipeline):
            return found
    raise InvalidInput(f"pipeline class {name!r} is neither diffusers' nor an invardiff built-in's")


def _component_class(library: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(library), name)
    except (ImportError, AttributeError, ValueError):
        raise InvalidInput(f"component class {library}.{name} cannot be imported") from None


def _weightless(component: type, folder: Path) -> bool:
    """Whether a model component has no parameters (built on the meta device: no memory)."""
    import torch

    if not (isinstance(component, type) and issubclass(component, torch.nn.Module)):
        return False
    try:
        with torch.device("meta"):
            model = component.from_config(component.load_config(folder))
    except Exception:  # noqa: BLE001 - a config it cannot be built from: not weightless
        return False
    return next(model.parameters(), None) is None


def _model_components(path: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """The pipeline class name and the ``(library, class)`` of each component folder."""
    try:
        index = json.loads((path / "model_index.json").read_text())
        name = index["_class_name"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise InvalidInput(f"{path}/model_index.json is not a diffusers model index") from None
    components = {
        key: (value[0], value[1])
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2
        and all(isinstance(v, str) for v in value)
    }  # fmt: skip
    return str(name), components


def check_checkpoint(source: str, revision: str | None) -> None:
    """Refuse a checkpoint folder that cannot be loaded, before any worker starts (exit 2):
    its model index, pipeline class and every component class must import, and every model
    component with parameters needs its weights (safetensors). Built-in models pass."""
    path = checkpoint_path(source, revision)
    if path is None:
        return
    name, components = _model_components(path)
    pipeline_class(name)
    for key, (library, class_name) in components.items():
        component = _component_class(library, class_name)
        folder = path / key
        if not (folder / "config.json").is_file():
            continue  # a scheduler, tokenizer or processor: no weights
        if any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
            continue
        if not _weightless(component, folder):
            raise InvalidInput(f"{source}: component {key!r} has no weights (*.safetensors)")


def _weightless_components(path: Path) -> dict[str, Any]:
    """Parameter-free model components (e.g. the digits DiT's identity VAE) built from their
    config: ``from_pretrained`` would look for a weights file they never had."""
    _, components = _model_components(path)
    built = {}
    for key, (library, class_name) in components.items():
        folder = path / key
        if (folder / "config.json").is_file() and not any(
            f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()
        ):
            component = _component_class(library, class_name)
            if _weightless(component, folder):
                built[key] = component.from_config(component.load_config(folder))
    return built


def load_pipeline(source: str, revision: str | None, dtype: str | None, device: str):
    """Load the pipeline of a checkpoint (eval mode, progress bars off) onto ``device``.

    A folder is loaded with the class its ``model_index.json`` names (an invardiff built-in
    class too, so a ``save_pretrained`` copy of the digits models loads), safetensors only.
    """
    import torch

    name = builtin_name(source)
    if name is not None:
        from invardiff.models import load_builtin

        pipe = load_builtin(name)
    else:
        path = checkpoint_path(source, revision)
        assert path is not None
        torch_dtype = getattr(torch, dtype) if dtype else None
        pipe = pipeline_class(_model_components(path)[0]).from_pretrained(
            path, torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True,
            **_weightless_components(path),
        )  # fmt: skip
    pipe = pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
