"""A cache of the frozen encoder's features, for validation and test passes after the first.

The evaluation transform is deterministic and the CLIP is frozen, so an image's features
(`CoTexNet.extract_features`) never change during a run: after the first pass only the
decoder and Img2text run (`CoTexNet.forward_features`). Entries are kept in memory up to
`memory_mb`, then on disk under `folder` (one safetensors file each), or not at all when no
folder is given. An entry's key names the base model (weight fingerprint), the image file
(resolved path, byte size, modification time) and the input size, so a different base, an
edited image or another resolution never reads a stale entry; nor does an encoder run in
another precision (its weights cast to bf16 or fp16: `CoTexNet.cast_frozen_encoder`).

The encoder runs outside autocast, in its weights' dtype, so that the features depend on
nothing else. They are stored in `dtype`: by default float16 from a float32 encoder (half
the memory, at a small relative error), else the encoder's own dtype (nothing to round). Every
pass, the first included, decodes the stored values, so all epochs see the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from common.errors import CoTexNetError


class FeatureCache:
    def __init__(self, model, input_size: int, folder: str | Path | None = None, memory_mb: float = 1024,
                 dtype: torch.dtype | None = None):
        self.fingerprint, self.encoder_dtype = model.base_fingerprint(), model.encoder_dtype
        self.input_size = input_size
        self.dtype = dtype or (torch.float16 if self.encoder_dtype == torch.float32 else self.encoder_dtype)
        self.folder = None if folder is None else Path(folder) / self.fingerprint[:16]
        self.memory_left = int(memory_mb * 2**20)
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def key(self, image_path: str | Path) -> str:
        path = Path(image_path).resolve()
        stat = path.stat()
        text = (f"{self.fingerprint}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{self.input_size}|{self.encoder_dtype}|"
                f"{self.dtype}")
        return hashlib.sha256(text.encode()).hexdigest()

    def _load(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None and (self.folder / f"{key}.safetensors").is_file():
            try:
                return load_file(self.folder / f"{key}.safetensors")
            except SafetensorError:  # a damaged entry is recomputed and rewritten
                return None
        return None

    def _store(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if size <= self.memory_left:
            self.memory[key] = entry
            self.memory_left -= size
        elif self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"{key}.safetensors") as tmp:
                save_file(entry, tmp)

    def features(self, model, pixel_values: torch.Tensor, image_paths) -> dict[str, torch.Tensor]:
        """The batch's features (on `pixel_values`' device, in the cache dtype): cached entries
        are read, the others computed in one encoder call and stored. Callable under autocast."""
        if model.encoder_dtype != self.encoder_dtype:
            raise CoTexNetError(f"feature cache: built for a {self.encoder_dtype} encoder, "
                                f"the model's is {model.encoder_dtype}")
        with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
            return self._features(model, pixel_values, image_paths)

    def _features(self, model, pixel_values: torch.Tensor, image_paths) -> dict[str, torch.Tensor]:
        keys = [self.key(p) for p in image_paths]
        entries = [self._load(k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            computed = model.extract_features(pixel_values[todo])
            for j, i in enumerate(todo):
                entries[i] = {name: t[j].to("cpu", self.dtype).contiguous() for name, t in computed.items()}
                self._store(keys[i], entries[i])
        return {name: torch.stack([e[name] for e in entries]).to(pixel_values.device) for name in entries[0]}
