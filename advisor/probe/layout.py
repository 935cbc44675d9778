"""The one reader of a pipeline's layout: which components it has, their libraries and classes, and their roles.

A layout comes from a local folder's ``model_index.json``, the Hugging Face cache, or the built-in
catalog (never the network), or from a loaded pipeline's components. `advisor.probe.models` builds
component profiles on it; `advisor.run.apply` plans post-load steps on it. Pure Python: class
names only; the run tier resolves them to classes when it needs to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from advisor.errors import ModelError
from advisor.files import json_type, read_json
from advisor.paths import CATALOG_DIR, diffusers_tables
from advisor.probe.hub_cache import cached_file


Role = str  # denoiser | text_encoder | vae | other
# Component names that are never torch modules (tokenizers, schedulers, processors).
NOT_MODELS = ("tokenizer", "scheduler", "feature_extractor", "processor", "image_processor")
_DENOISER_CLASS = re.compile(r"(Transformer\w*Model|UNet\w*Model)$")


def role_of(name: str, class_name: str) -> Role:
    """What a component does in the pipeline, from its name and class name."""
    if name.startswith(("transformer", "unet", "prior")) or _DENOISER_CLASS.search(class_name):
        return "denoiser"
    if name.startswith("vae") or class_name.startswith(("Autoencoder", "AsymmetricAutoencoder", "VQModel")):
        return "vae"
    if name.startswith(("text_encoder", "image_encoder")):
        return "text_encoder"
    return "other"


@dataclass(frozen=True)
class ComponentEntry:
    library: str | None  # "diffusers", "transformers", ...; None when the source doesn't say
    class_name: str


@dataclass
class PipelineLayout:
    """The components of a pipeline (name -> library and class name); ``entries`` None means unknown."""

    entries: dict[str, ComponentEntry] | None
    pipeline_class: str | None = None
    source: str = "unknown"  # folder | cache | catalog | pipeline | unknown
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def known(self) -> bool:
        return self.entries is not None

    def names(self) -> list[str]:
        return list(self.entries or {})

    def entry(self, name: str) -> ComponentEntry | None:
        return (self.entries or {}).get(name)

    def class_name(self, name: str) -> str:
        entry = self.entry(name)
        return entry.class_name if entry is not None else name

    def role(self, name: str) -> Role:
        return role_of(name, self.class_name(name))


def index_entries(index: dict[str, Any]) -> dict[str, ComponentEntry]:
    """The components a ``model_index.json`` lists (``name: [library, class]``), in file order."""
    entries = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        library, class_name = spec
        entries[name] = ComponentEntry(library if isinstance(library, str) else None, str(class_name))
    return entries


def pipeline_settings(index: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own settings a ``model_index.json`` holds beside its components: scalar values
    its ``__init__`` registers to its config (SDXL's ``force_zeros_for_empty_prompt``, Wan2.2's
    ``expand_timesteps``, FLUX.2 [klein]'s ``is_distilled``)."""
    return {
        name: value
        for name, value in index.items()
        if not name.startswith("_") and (value is None or isinstance(value, (bool, int, float, str)))
    }


def check_model_index(index: dict[str, Any], path: Path) -> None:
    """A `ModelError` naming `path` and the entry when a component entry is not a ``[library, class]``
    pair of names (``[null, null]``: saved without that component). Other keys are the pipeline's
    own settings (SDXL's ``force_zeros_for_empty_prompt``) and are left alone."""
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if isinstance(spec, list) and not _is_folder_name(name):  # diffusers loads it from the subfolder of that name
            raise ModelError(
                f"{path}: the component {name!r} is not a folder of the model; a component entry is "
                "named after its subfolder, e.g. 'vae' or 'text_encoder_2'"
            )
        if isinstance(spec, list):
            if len(spec) != 2 or not all(part is None or isinstance(part, str) for part in spec):
                raise ModelError(
                    f"{path}: {name!r} is {json.dumps(spec)[:80]}; a component entry is a [library, class] pair "
                    'of names, e.g. ["diffusers", "AutoencoderKL"], or [null, null] for none'
                )
        elif role_of(name, "") != "other" or name.startswith(NOT_MODELS):
            raise ModelError(
                f"{path}: {name!r} is {json.dumps(spec)[:80]}; a component entry is a [library, class] pair, "
                'e.g. ["diffusers", "AutoencoderKL"], or [null, null] for none'
            )


def names_a_folder(model: str | Path) -> bool:
    """Whether `model` can only mean a local folder (a path object, or a name no hub id or alias has)."""
    return isinstance(model, Path) or model.startswith(("/", ".", "~")) or model.count("/") > 1


def no_such_folder(model: str | Path) -> ModelError:
    return ModelError(f"{model}: no such folder; give a pipeline folder, a hub id or a catalog name")


def _is_folder_name(name: str) -> bool:
    """A plain folder name: no separator, not the folder itself or its parent."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def check_vae(index: dict[str, Any], index_path: Path, pipeline_class: str, weighted: list[str]) -> None:
    """A `ModelError` when a pipeline class that decodes its latents with a VAE (diffusers'
    ``model_cpu_offload_seq`` moves a ``vae``) is saved without one among its `weighted` components."""
    if "vae" not in (pipeline_facts(pipeline_class) or {}).get("offload_sequence", []) or "vae" in weighted:
        return
    spec = index.get("vae")
    needs = f"{pipeline_class} decodes its latents with a VAE (diffusers' pipeline takes vae=...)"
    if spec is None:
        raise ModelError(
            f'{index_path}: has no \'vae\' entry, but {needs}; restore it, e.g. "vae": ["diffusers", "AutoencoderKL"]'
        )
    if isinstance(spec, list) and spec[1:2] == [None]:
        raise ModelError(f"{index_path}: 'vae' is {json.dumps(spec)} (saved without a VAE), but {needs}")
    raise ModelError(f"{index_path.parent / 'vae'}: no safetensors weights, but {needs} and model_index.json lists it")


def layout_from_index(index: dict[str, Any], source: str) -> PipelineLayout:
    return PipelineLayout(index_entries(index), index.get("_class_name"), source)


# --- class facts (generated table) --------------------------------------------------------------


def pipeline_facts(pipeline_class: str) -> dict[str, Any] | None:
    return diffusers_tables()["pipelines"].get(pipeline_class)


def repeated_block_classes(class_name: str) -> list[str]:
    """The block classes a diffusers model class lists in ``_repeated_blocks``."""
    return list(diffusers_tables()["models"].get(class_name, {}).get("repeated_blocks") or [])


def has_repeated_blocks(class_name: str) -> bool:
    """Whether a diffusers model class lists ``_repeated_blocks`` (what ``compile_repeated_blocks`` compiles)."""
    return bool(repeated_block_classes(class_name))


# --- catalog ------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def catalog_index() -> dict[str, Path]:
    """Catalog file for every model id and alias (lower-cased)."""
    index: dict[str, Path] = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        entry = json.loads(path.read_text())
        for name in (entry["model_id"], *entry.get("aliases", []), path.stem):
            index[name.lower()] = path
    return index


def catalog_names() -> list[str]:
    """The model ids the catalog knows (aliases not repeated)."""
    return sorted({json.loads(p.read_text())["model_id"] for p in set(catalog_index().values())})


@lru_cache(maxsize=64)
def catalog_path(name: str) -> Path | None:
    """The catalog file of a model id or alias (case-insensitive), or None.

    An entry is named after its repository (black-forest-labs/FLUX.1-dev: flux.1-dev.json), so a
    model id finds its file without the index, which reads every entry (~250 KB of JSON)."""
    name = str(name).lower()
    owner, _, repository = name.rpartition("/")
    named = CATALOG_DIR / f"{repository}.json"
    if owner and named.is_file() and json.loads(named.read_text())["model_id"].lower() == name:
        return named
    return catalog_index().get(name)


def catalog_entry(name: str) -> dict[str, Any] | None:
    """The catalog's JSON for a model id or alias (case-insensitive), or None."""
    path = catalog_path(name)
    return {**json.loads(path.read_text()), "_path": str(path)} if path else None


def layout_from_catalog(entry: dict[str, Any]) -> PipelineLayout:
    entries = {
        item["name"]: ComponentEntry(item["library"], item["class_name"]) for item in entry.get("components", [])
    }
    for name, class_name in entry.get("other_components", {}).items():
        entries[name] = ComponentEntry(None, class_name)
    return PipelineLayout(entries, entry.get("pipeline_class"), "catalog")


# --- reading it -----------------------------------------------------------------------------------


def read_model_index(model: str | Path) -> tuple[dict[str, Any], str] | None:
    """``model_index.json`` of a local folder or a cached hub repo, and where it was; never the network."""
    folder = Path(model)
    if (folder / "model_index.json").is_file():
        return _index_object(folder / "model_index.json"), "folder"
    try:
        found = cached_file(str(model), "model_index.json")
    except (OSError, ValueError):  # not a repo id, or an unreadable cache
        found = None
    if isinstance(found, str):
        return _index_object(Path(found)), "cache"
    return None


def _index_object(path: Path) -> dict[str, Any]:
    index = read_json(path, error=ModelError)
    if not isinstance(index, dict):
        raise ModelError(f"{path}: expected a JSON object (the pipeline's index), got a JSON {json_type(index)}")
    return index


def read_layout(model: str | Path | None) -> PipelineLayout:
    """What `model` holds without loading weights: local folder, HF cache, then the built-in catalog."""
    if model is None:
        return PipelineLayout(None)
    try:
        found = read_model_index(model)
    except (OSError, ModelError):  # unreadable, not JSON or not an object: the loader reports it properly
        found = None
    if found is not None:
        return layout_from_index(*found)
    entry = catalog_entry(str(model))
    return layout_from_catalog(entry) if entry is not None else PipelineLayout(None)


def layout_of_components(components: dict[str, Any], pipeline_class: str | None) -> PipelineLayout:
    """The layout of a loaded pipeline (``pipe.components``); the library is each object's top module."""
    entries = {
        name: ComponentEntry(type(obj).__module__.split(".")[0], type(obj).__name__)
        for name, obj in components.items()
        if obj is not None
    }
    return PipelineLayout(entries, pipeline_class, "pipeline")
