"""Stage 2: describe every ROI image (number, location, shape, size, color) and write the text CSV.

Describers:
  llava     LLaVA-1.5 answers all five attributes (the paper); number clipped to the mask's
            regions, box locations turned into words, invalid answers re-asked (at most
            --max-retries answers in all), then the geometry answer is used and counted as a fallback.
  geometry  everything from the mask and ROI alone, offline and in seconds (no model).
  hybrid    LLaVA for shape and color, geometry for number, location and size.

Output: text_file/<dataset>/<dataset>_text_out.csv (the paper's columns + source, tries).
Results are appended to a .partial CSV as they come: rerunning after a crash or kill skips
the ROIs already done (--overwrite starts over).

One process spreads the model over every visible GPU. Data parallel: `accelerate launch
--multi_gpu --num_processes N get_text.py ...` (also on CPU-only machines, over gloo)
gives each process a shard of the ROIs and its own slice of the GPUs; the main process
merges the shards into the final CSV (across nodes the output folder must be shared).

Examples:
  python get_text.py --dataset-name kvasir --model-path ./llava_inference/llava-v1.5-13b-hf
  python get_text.py --dataset-name kvasir --describer geometry
  accelerate launch --multi_gpu --num_processes 4 get_text.py --dataset-name kvasir \
      --model-path ./llava_inference/llava-v1.5-13b-hf --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import CoTexNetError, run_cli
from data_process import layout, registry
from llava_inference import geometry
from llava_inference.attributes import Attributes
from llava_inference.text_to_csv import ResultWriter, empty_row, make_row


@dataclass
class RoiItem:
    roi_name: str          # relative to ROIs/, as written by make_ROI_img.py
    roi_path: Path
    mask_path: Path
    label: int             # the mask's label value of this ROI (1 for binary masks)
    keyword: str

    def load(self, spec) -> tuple[np.ndarray, np.ndarray]:
        """The ROI image (RGB) and its binary mask at the ROI's size."""
        roi = registry.read_image(self.roi_path)
        mask = registry.read_mask(self.mask_path, spec, size=(roi.shape[1], roi.shape[0]))
        return roi, (mask == self.label).astype(np.uint8)


def list_rois(dataset_dir: Path, spec, keywords, img_format: str | None = None,
              mask_format: str | None = None) -> list[RoiItem]:
    """Every ROI image of the dataset with its mask; `keywords` = per category (or one for binary)."""
    roi_dir = dataset_dir / "ROIs"
    if not roi_dir.is_dir():
        raise CoTexNetError(f"{roi_dir}: no ROI folder (run data_process/make_ROI_img.py first)")
    masks = {registry.image_stem(mask, spec): dataset_dir / "masks" / mask
             for _, mask in registry.pair_files(dataset_dir, spec, img_format, mask_format).pairs}
    items = []
    for name in layout.list_files(roi_dir, (layout.ROI_EXT,)):
        path = roi_dir / name
        stem, category = layout.parse_roi_name(name, bool(spec.categories))
        if stem not in masks:
            raise CoTexNetError(f"{path}: ROI without a mask (no mask of image {stem} in {dataset_dir / 'masks'})")
        if spec.categories:
            if category not in spec.categories:
                raise CoTexNetError(f"{path}: category {category!r} is not one of {', '.join(spec.categories)}")
            label = spec.categories.index(category) + 1
        else:
            label = 1
        items.append(RoiItem(name, path, masks[stem], label, keywords[label - 1]))
    if not items:
        raise CoTexNetError(f"{roi_dir}: no ROI images (*.jpg)")
    return items


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True, help="registry name (dataset_config/datasets.yaml) or any name")
    parser.add_argument("--model-path", default="./llava_inference/llava-v1.5-13b",
                        help="LLaVA-1.5 folder in the llava-hf layout (convert the original with llava_inference/convert_llava.py)")
    parser.add_argument("--dataset-path", type=Path, help="folder with images/, masks/, ROIs/ (default data_process/<name>)")
    parser.add_argument("--img-format", help="image extension, e.g. .jpg (default: the registry's, else any image)")
    parser.add_argument("--mask-format", help="mask extension, e.g. .png (default: the registry's, else any image)")
    parser.add_argument("--keywords", help="what the masks show, e.g. 'polyp area'; multi-class: one per category, comma-separated")
    parser.add_argument("--describer", choices=["llava", "geometry", "hybrid"], default="llava", help="see above")
    parser.add_argument("--batch-size", type=int, default=8, help="ROIs per generate() call")
    parser.add_argument("--max-retries", type=int, default=5, help="answers drawn per ROI at most before the geometry fallback")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                        help="weights on GPU (auto: bfloat16 where supported, else float16; CPU: float32)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, help="CSV to write (default text_file/<name>/<name>_text_out.csv)")
    parser.add_argument("--no-constrain", action="store_true", help="free sampling as the paper (validated, retried) instead of JSON-grammar decoding")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (paper: 512)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (paper: 0.2; 0 = greedy)")
    parser.add_argument("--overwrite", action="store_true", help="ignore results of earlier runs and describe every ROI again")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_retries < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size, --max-retries and --max-new-tokens must be at least 1")
    return args


def prepare(item: RoiItem, spec, writer: ResultWriter, progress):
    """(ROI, geometry attributes) of an ROI with a region; an empty one is written at once (None)."""
    roi, mask = item.load(spec)
    if geometry.count_regions(mask) == 0:
        writer.add(empty_row(item.roi_name, item.keyword))
        progress.update()
        return None
    return roi, geometry.describe(mask, roi, str(item.mask_path))


def describe_geometry(items, spec, writer: ResultWriter, progress) -> None:
    for item in items:
        prepared = prepare(item, spec, writer, progress)
        if prepared is not None:
            writer.add(make_row(item.roi_name, prepared[1], item.keyword, "geometry", 0))
            progress.update()


def process_gpus(state) -> list[int]:
    """This process's share of the visible GPUs: all of them for one process, a slice for each of several."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    per = max(1, count // state.num_processes)
    first = (state.local_process_index * per) % count
    return list(range(first, first + per))


def describe_llava(items, spec, writer: ResultWriter, progress, args, gpus: list[int]) -> None:
    from llava_inference.llava_model import LlavaDescriber

    describer = LlavaDescriber(args.model_path, dtype=args.dtype, constrain=not args.no_constrain,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               seed=args.seed, gpus=gpus)
    for start in range(0, len(items), args.batch_size):
        prepared = [(item, prepare(item, spec, writer, progress)) for item in items[start:start + args.batch_size]]
        prepared = [(item, *p) for item, p in prepared if p is not None]
        if not prepared:
            continue
        batch, rois, measured = zip(*prepared, strict=True)
        answers = describer.describe(list(rois), [item.keyword for item in batch],
                                     [m.number for m in measured], args.max_retries)
        for item, truth, (answer, tries) in zip(batch, measured, answers, strict=True):
            if answer is None:
                attrs, source = truth, "fallback"
            elif args.describer == "hybrid":
                attrs, source = Attributes(truth.number, truth.location, answer.shape, truth.size, answer.color), "hybrid"
            else:
                attrs, source = answer, "llava"
            writer.add(make_row(item.roi_name, attrs, item.keyword, source, tries))
            progress.update()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = registry.get_spec(args.dataset_name)
    named = registry.get_spec(args.dataset_name, args.keywords)
    keywords = named.categories or (named.keyword,)
    dataset_dir = args.dataset_path or layout.dataset_dir(layout.DEFAULT_ROOT, args.dataset_name)
    out = args.out or layout.text_csv(args.dataset_name)
    if args.describer != "geometry":
        from llava_inference.llava_model import check_model_folder

        check_model_folder(Path(args.model_path))  # before anything is written

    import torch
    from accelerate import PartialState  # one process unless started by `accelerate launch` / torchrun

    # cpu=True on CPU-only machines: several processes there then talk over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    items = list_rois(dataset_dir, spec, keywords, args.img_format, args.mask_format)
    shard = f"-{state.process_index}" if state.num_processes > 1 else ""
    if args.overwrite and state.is_main_process:
        ResultWriter.discard_partials(out)
    state.wait_for_everyone()
    writer = ResultWriter(out, shard=shard, fresh=args.overwrite)
    # Every process reads the finished ROIs before any writes new ones: all shard the same list.
    state.wait_for_everyone()
    todo = [item for item in items if item.roi_name not in writer.rows]
    earlier = len(items) - len(todo)
    todo = todo[state.process_index::state.num_processes]
    progress = tqdm(total=len(todo), desc=f"describing ({args.describer})", unit="ROI", disable=not state.is_main_process)
    try:
        if args.describer == "geometry":
            describe_geometry(todo, spec, writer, progress)
        else:
            describe_llava(todo, spec, writer, progress, args, process_gpus(state))
    finally:
        progress.close()
        writer.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    table = writer.finalize([item.roi_name for item in items])
    sources = Counter(table["source"])
    tries = table["tries"].astype(int)
    print(f"{len(table)} rows ({earlier} from earlier runs) by {state.num_processes} process(es); "
          f"sources: {dict(sources)}; tries: total {tries.sum()}, max {tries.max()}; "
          f"fallbacks to geometry: {sources.get('fallback', 0)}", file=sys.stderr)
    print(f"text CSV written to {out}")


if __name__ == "__main__":
    run_cli(main)
