"""Where the describer's model comes from (a folder or a Hugging Face id) and whether it can describe.

`inspect_model(path_or_id)` checks everything that needs no weights, before anything is
written: the folder's files (or, for a hub id, the cached or downloadable config), that
transformers' `AutoModelForImageTextToText` knows the architecture, and that its processor
takes an image and gives a prompt format (`prompts.prompt_format`). Each refusal is one line
naming the folder and what is missing; an original LLaVA-1.5 folder is pointed to convert_llava.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import CoTexNetError
from llava_inference.prompts import PAPER_MODEL_TYPE, PromptFormat, prompt_format

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    """A model that can describe ROIs: where it loads from, its config and its prompt format."""

    name: str           # what the settings record: a folder's absolute path, or the hub id
    location: str       # what from_pretrained gets
    config: dict        # config.json
    processor: object   # AutoProcessor of the model (tokenizer + image processor)
    prompt: PromptFormat

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CoTexNetError(f"{config_file}: not a readable JSON config ({err})") from err
    if not isinstance(config, dict):
        raise CoTexNetError(f"{config_file}: not a JSON object")
    return config


def check_model_folder(path: Path) -> dict:
    """The folder's config; one line naming what is missing for a transformers VLM folder, or
    why its architecture cannot describe."""
    if not path.is_dir():
        raise CoTexNetError(f"{path}: no such model folder (--model-path)")
    config_file = path / "config.json"
    config = _read_config(config_file) if config_file.is_file() else {}
    if "mm_vision_tower" in config or "LlavaLlamaForCausalLM" in config.get("architectures", []):
        raise CoTexNetError(f"{path}: original LLaVA format; convert it once: python llava_inference/convert_llava.py "
                            f"--src {path} --vision-tower <clip-vit-large-patch14-336 folder> --out {path}-hf")
    if "model_type" in config:  # the architecture says more than which files are missing
        check_architecture(config, str(path))
    checks = {
        "config.json with model_type": "model_type" in config,
        "weights (*.safetensors or pytorch_model*.bin)": any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")),
        "tokenizer (tokenizer.json, tokenizer.model or vocab.json)": any(
            (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")),
        "image processor (preprocessor_config.json)": (path / "preprocessor_config.json").is_file()
        or (path / "processor_config.json").is_file(),
    }
    missing = [what for what, ok in checks.items() if not ok]
    if missing:
        raise CoTexNetError(f"{path}: not a vision-language model folder in the transformers layout; "
                            f"missing {'; '.join(missing)}")
    return config


def _hub_config(model_id: str) -> dict:
    """config.json of a hub model: from the local cache, or downloaded unless HF_HUB_OFFLINE is set."""
    from transformers.utils import cached_file

    try:
        config_file = cached_file(model_id, "config.json")
    except OSError as err:
        raise CoTexNetError(f"{model_id}: no such model folder, and no Hugging Face model of this id in the cache "
                            f"or reachable ({' '.join(str(err).split())[:160]})") from None
    return _read_config(Path(config_file))


def check_architecture(config: dict, source: str) -> None:
    """Refuse, naming it, a model type that AutoModelForImageTextToText cannot load."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = config.get("model_type")
    architectures = ", ".join(config.get("architectures") or ()) or "no architectures listed"
    if model_type not in CONFIG_MAPPING_NAMES:
        raise CoTexNetError(f"{source}: model type {model_type!r} ({architectures}) is unknown to this transformers; "
                            "a newer model may need a newer transformers")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise CoTexNetError(f"{source}: model type {model_type!r} ({architectures}) is not an image-text-to-text "
                            "model (AutoModelForImageTextToText cannot load it); the describer must be a "
                            "vision-language model such as LLaVA-1.5, LLaVA-NeXT or Qwen2-VL")


def inspect_model(model_path: str) -> ModelSource:
    """Everything about the describer's model except its weights; one-line errors (see module doc)."""
    from transformers import AutoProcessor

    path = Path(model_path)
    if not path.exists() and HUB_ID.fullmatch(model_path):
        name = location = model_path
        config = _hub_config(model_path)
        check_architecture(config, model_path)
    else:
        config = check_model_folder(path)
        name, location = str(path.resolve()), str(path)
    # LLaVA-1.5: PIL resampling as the original's CLIPImageProcessor; legacy tokenisation as the
    # original's whatever the folder's tokenizer_config says (the text after <image> keeps its
    # sentencepiece space). Other families: their processors' defaults.
    paper = {"backend": "pil", "legacy": True} if config["model_type"] == PAPER_MODEL_TYPE else {}
    try:
        processor = AutoProcessor.from_pretrained(location, **paper)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CoTexNetError(f"{model_path}: its processor does not load ({' '.join(str(err).split())[:200]})") from None
    if not hasattr(processor, "tokenizer"):  # AutoProcessor falls back to a lone tokenizer or image processor
        raise CoTexNetError(f"{model_path}: model type {config['model_type']!r} has no processor that takes text and "
                            "an image together (processor_config.json or the model's processor class)")
    return ModelSource(name, location, config, processor, prompt_format(processor, config["model_type"], model_path))
