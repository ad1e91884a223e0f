"""Stage 2, get_text.py's work: from the ROI images to the text CSV.

`run(job)` is the whole stage: check the model (before anything is written), list the
ROIs, refuse earlier rows made with another describer or other keywords, skip those an earlier
run finished, describe this process's share, append each finished
row to the resumable CSV (text_csv_writer.ResultWriter), and on the main process merge the shards
into the final CSV. The describers are generators of finished rows (`geometry_rows`,
`model_rows`): they read files and ask the model, and write nothing; `run` writes every row and
advances the progress bar in one place. The model is a `describer.Describer` of the backend
`load_describer` picks (transformers: any image-text-to-text model; vllm: the vLLM engine).

Data parallel: under `accelerate launch` (or torchrun) each process takes every N-th ROI still
to do and its own slice of the GPUs; alone, a process takes every ROI and spreads the model over
every visible GPU. `--backend vllm` runs one process: the vLLM engine batches the ROIs itself and
splits the model over `--tensor-parallel` GPUs (llava_inference/vllm_describer.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from common.errors import CoTexNetError
from common.output_folders import OutputFolder
from data_process import layout
from data_process.decoding import read_image, read_mask
from data_process.pairing import image_stem, pair_files
from data_process.registry import get_spec
from llava_inference import geometry
from llava_inference.attributes import Attributes
from llava_inference.describer import Describer
from llava_inference.model_folder import ModelSource, inspect_model
from llava_inference.quantization import meta_model, quantization_config, require_bitsandbytes
from llava_inference.text_csv_writer import ResultWriter, empty_row, make_row, start_output

# What a settings record written before an option existed means: the option's value then.
EARLIER_DEFAULTS = {"quantize": "none", "backend": "transformers"}


@dataclass(frozen=True)
class Job:
    """What to describe and how; the fields are get_text.py's options (see its --help)."""

    dataset_name: str
    dataset_path: Path | None  # None: layout's default folder of the dataset
    img_format: str | None
    mask_format: str | None
    keywords: str | None       # None: the registry's
    out: Path | None           # None: layout's default text CSV
    describer: str             # llava | geometry | hybrid
    model_path: str            # folder or Hugging Face id
    quantize: str              # none | 8bit | 4bit
    backend: str               # transformers | vllm
    tensor_parallel: int       # vllm: GPUs one copy of the model is split over
    batch_size: int
    max_retries: int
    dtype: str
    seed: int
    constrain: bool
    max_new_tokens: int
    temperature: float
    overwrite: bool


@dataclass(frozen=True)
class Summary:
    """The main process's result: the final table and where its rows came from."""

    table: pd.DataFrame
    earlier: int     # rows taken from earlier runs
    processes: int
    out: Path


@dataclass(frozen=True)
class RoiItem:
    roi_name: str          # relative to ROIs/, as written by make_ROI_img.py
    roi_path: Path
    mask_path: Path
    label: int             # the mask's label value of this ROI (1 for binary masks)
    keyword: str

    def load(self, spec) -> tuple[np.ndarray, np.ndarray]:
        """The ROI image (RGB) and its binary mask at the ROI's size."""
        roi = read_image(self.roi_path)
        mask = read_mask(self.mask_path, spec, size=(roi.shape[1], roi.shape[0]))
        return roi, (mask == self.label).astype(np.uint8)


def list_rois(dataset_dir: Path, spec, keywords, img_format: str | None = None,
              mask_format: str | None = None) -> list[RoiItem]:
    """Every ROI image of the dataset with its mask, its augmented copies' too (named as in their
    own ROIs/: a copy's name is never an original's); `keywords` = per category (or one for binary)."""
    roi_dir = dataset_dir / "ROIs"
    if not roi_dir.is_dir():
        raise CoTexNetError(f"{roi_dir}: no ROI folder (run data_process/make_ROI_img.py first)")
    items = []
    for folder in layout.data_folders(dataset_dir):
        masks = {image_stem(mask, spec): folder / "masks" / mask
                 for _, mask in pair_files(folder, spec, img_format, mask_format).pairs}
        for name in layout.list_files(folder / "ROIs", (layout.ROI_EXT,)) if (folder / "ROIs").is_dir() else []:
            path = folder / "ROIs" / name
            stem, category = layout.parse_roi_name(name, bool(spec.categories))
            if stem not in masks:
                raise CoTexNetError(f"{path}: ROI without a mask (no mask of image {stem} in {folder / 'masks'})")
            if spec.categories and category not in spec.categories:
                raise CoTexNetError(f"{path}: category {category!r} is not one of {', '.join(spec.categories)}")
            label = spec.categories.index(category) + 1 if spec.categories else 1
            items.append(RoiItem(name, path, masks[stem], label, keywords[label - 1]))
    if not items:
        raise CoTexNetError(f"{roi_dir}: no ROI images (*{layout.ROI_EXT})")
    return items


def _measure(item: RoiItem, spec) -> tuple[np.ndarray, Attributes | None]:
    """The ROI image and what its mask shows; None where the mask is empty (nothing to describe)."""
    roi, mask = item.load(spec)
    return roi, geometry.measure(mask, roi, str(item.mask_path)) if geometry.count_regions(mask) else None


def geometry_rows(items: list[RoiItem], spec) -> Iterator[dict]:
    """The row of each ROI from its mask and image alone, one by one."""
    for item in items:
        _, truth = _measure(item, spec)
        yield (empty_row(item.roi_name, item.keyword) if truth is None
               else make_row(item.roi_name, truth, item.keyword, "geometry", 0))


def model_rows(items: list[RoiItem], spec, model, hybrid: bool, batch_size: int, max_retries: int) -> Iterator[dict]:
    """The row of each ROI from `model` (a Describer), `batch_size` ROIs per call: an empty
    mask's row at once, the others once their batch is answered. An ROI without a valid answer
    gets the geometry row (source `fallback`); `hybrid` takes number, location and size from the mask."""
    for start in range(0, len(items), batch_size):
        asked = []
        for item in items[start:start + batch_size]:
            roi, truth = _measure(item, spec)
            if truth is None:
                yield empty_row(item.roi_name, item.keyword)
            else:
                asked.append((item, roi, truth))
        if not asked:
            continue
        batch, rois, truths = zip(*asked, strict=True)
        answers = model.ask(list(rois), [item.keyword for item in batch], [t.number for t in truths], max_retries)
        for item, truth, (answer, tries) in zip(batch, truths, answers, strict=True):
            if answer is None:
                attrs, source = truth, "fallback"
            elif hybrid:
                attrs, source = Attributes(truth.number, truth.location, answer.shape, truth.size, answer.color), "hybrid"
            else:
                attrs, source = answer, "llava"
            yield make_row(item.roi_name, attrs, item.keyword, source, tries)


def process_gpus(state) -> list[int]:
    """This process's share of the visible GPUs: all of them for one process, a slice for each of several."""
    count = torch.cuda.device_count()
    if count == 0:
        return []
    per = max(1, count // state.num_processes)
    first = (state.local_process_index * per) % count
    return list(range(first, first + per))


def recorded_settings(job: Job, keywords, model: ModelSource | None) -> dict:
    """What the rows depend on (not how fast they come: batch size, dtype, tensor parallel): one CSV
    never mixes two. The backend is one of them: its kernels may round differently."""
    settings = {"describer": job.describer, "keywords": list(keywords)}
    if model is not None:
        settings.update(model_path=model.name, quantize=job.quantize, backend=job.backend, constrain=job.constrain,
                        temperature=job.temperature, max_new_tokens=job.max_new_tokens, seed=job.seed)
    return settings


def load_describer(job: Job, model: ModelSource, gpus: list[int]) -> Describer:
    """The describer that runs `model` for this job, on the backend it names."""
    if job.backend == "vllm":
        from llava_inference.vllm_describer import VllmDescriber

        return VllmDescriber(model, dtype=job.dtype, constrain=job.constrain, max_new_tokens=job.max_new_tokens,
                             temperature=job.temperature, seed=job.seed, tensor_parallel=job.tensor_parallel)
    from llava_inference.transformers_backend import TransformersDescriber

    return TransformersDescriber(model, dtype=job.dtype, quantize=job.quantize, constrain=job.constrain,
                                 max_new_tokens=job.max_new_tokens, temperature=job.temperature, seed=job.seed,
                                 gpus=gpus)


def run(job: Job) -> Summary | None:
    """Describe every ROI of the dataset not yet in the CSV; the main process returns the summary
    once the final CSV is written, the other processes None."""
    spec = get_spec(job.dataset_name)
    named = get_spec(job.dataset_name, job.keywords)
    dataset_dir = job.dataset_path or layout.dataset_dir(layout.DEFAULT_ROOT, job.dataset_name)
    out = job.out or layout.text_csv(job.dataset_name)
    model = None
    if job.describer == "geometry":
        if job.quantize != "none":
            raise CoTexNetError(f"--quantize {job.quantize}: only with a model (--describer llava or hybrid)")
    else:
        require_bitsandbytes(job.quantize)
        model = inspect_model(job.model_path)  # before anything is written
        if job.quantize != "none":  # a model bitsandbytes cannot quantise is refused here too
            quantization_config(job.quantize, meta_model(model.location), torch.bfloat16)
        if job.backend == "vllm":
            from llava_inference.vllm_describer import import_vllm

            import_vllm()

    from accelerate import PartialState  # one process unless started by `accelerate launch` / torchrun

    # cpu=True on CPU-only machines: several processes there then talk over gloo. vLLM's engine
    # takes the GPUs itself: its caller keeps off them.
    state = PartialState(cpu=job.backend == "vllm" or not torch.cuda.is_available())
    if job.backend == "vllm" and state.num_processes > 1:
        raise CoTexNetError("--backend vllm: start one process (not accelerate launch or torchrun); the engine "
                            "batches every ROI itself and splits the model over --tensor-parallel N GPUs")
    keywords = named.categories or (named.keyword,)
    items = list_rois(dataset_dir, spec, keywords, job.img_format, job.mask_format)
    # The CSV, its partial and settings files never go among what this command reads.
    reads = [folder / sub for folder in layout.data_folders(dataset_dir) for sub in ("images", "masks", "ROIs")]
    OutputFolder(out.parent, "--out", [*reads, *([model.location] if model and Path(model.location).is_dir() else [])])
    if state.is_main_process:
        start_output(out, recorded_settings(job, keywords, model), job.overwrite, EARLIER_DEFAULTS)
    state.wait_for_everyone()
    writer = ResultWriter(out, shard=f"-{state.process_index}" if state.num_processes > 1 else "")
    # Every process reads the finished ROIs before any writes new ones: all shard the same list.
    state.wait_for_everyone()
    todo = [item for item in items if item.roi_name not in writer.rows]
    earlier = len(items) - len(todo)
    todo = todo[state.process_index::state.num_processes]
    progress = tqdm(total=len(todo), desc=f"describing ({job.describer})", unit="ROI", disable=not state.is_main_process)
    try:
        if job.describer == "geometry":
            rows = geometry_rows(todo, spec)
        else:
            describer = load_describer(job, model, process_gpus(state))
            rows = model_rows(todo, spec, describer, job.describer == "hybrid", job.batch_size, job.max_retries)
        for row in rows:
            writer.add(row)
            progress.update()
    finally:
        progress.close()
        writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return Summary(writer.finalize([item.roi_name for item in items]), earlier, state.num_processes, out)
