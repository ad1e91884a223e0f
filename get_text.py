"""Stage 2: describe every ROI image (number, location, shape, size, color) and write the text CSV.

Describers:
  llava     the model at --model-path answers all five attributes: LLaVA-1.5 (the paper) or any
            image-text-to-text model transformers loads (LLaVA-NeXT, Qwen2-VL, ...: by folder or
            Hugging Face id); number clipped to the mask's regions, box locations turned into
            words, invalid answers re-asked (at most --max-retries answers in all), then the
            geometry answer is used and counted as a fallback.
  geometry  everything from the mask and ROI alone, offline and in seconds (no model).
  hybrid    the model for shape and color, geometry for number, location and size.

LLaVA-1.5 gets the paper's exact input (v1 prompt, ROI padded to a square); any other model the
paper's question in its own chat template. Answers are decoded under one JSON grammar built from
the model's tokenizer, so the CSV is the same whatever the model. --quantize 8bit / 4bit puts the
language model in 8 or 4 bits (bitsandbytes; vision tower, projector and LM head stay 16-bit):
LLaVA-1.5-13B in 4 bits fits one 12 GB GPU.

Output: text_file/<dataset>/<dataset>_text_out.csv (the paper's columns + source, tries).
Results are appended to a .partial CSV as they come: rerunning after a crash or kill skips
the ROIs already done (--overwrite removes the earlier CSVs and starts over). The options the
rows are made with (describer, keywords; with a model its folder or id, quantisation, backend, decoding and seed) are kept
in <out stem>.settings.json beside the CSV: a
rerun with others is refused, so that one CSV never mixes two settings.

One process spreads the model over every visible GPU. `--backend vllm` runs the model on the vLLM
engine instead, split over `--tensor-parallel N` GPUs (get_text.py then runs under the vLLM venv's
Python: `make vllm-venv`; same CSV, resume, retries and fallback). Data parallel: `accelerate launch
--multi_gpu --num_processes N get_text.py ...` (also on CPU-only machines, over gloo)
gives each process a shard of the ROIs and its own slice of the GPUs; the main process
merges the shards into the final CSV (across nodes the output folder must be shared).

Examples:
  python get_text.py --dataset-name kvasir --model-path ./llava_inference/llava-v1.5-13b-hf
  python get_text.py --dataset-name kvasir --model-path ./llava_inference/llava-v1.5-13b-hf --quantize 4bit
  python get_text.py --dataset-name kvasir --model-path Qwen/Qwen2-VL-7B-Instruct
  python get_text.py --dataset-name kvasir --describer geometry
  .venv-vllm/bin/python get_text.py --dataset-name kvasir --model-path ./llava_inference/llava-v1.5-13b-hf \
      --backend vllm --tensor-parallel 2
  accelerate launch --multi_gpu --num_processes 4 get_text.py --dataset-name kvasir \
      --model-path ./llava_inference/llava-v1.5-13b-hf --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from common.errors import run_cli
from llava_inference import quantization, text_stage


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True, help="registry name (dataset_config/datasets.yaml) or any name")
    parser.add_argument("--model-path", default="./llava_inference/llava-v1.5-13b",
                        help="the model's folder or Hugging Face id: LLaVA-1.5 in the llava-hf layout (convert the "
                             "original with llava_inference/convert_llava.py) or any image-text-to-text model")
    parser.add_argument("--quantize", choices=quantization.MODES, default="none",
                        help="language model weights in 8 or 4 bits (bitsandbytes; 4bit: NF4, double quantisation, "
                             "bf16 compute); the vision tower, projector and LM head stay 16-bit")
    parser.add_argument("--dataset-path", type=Path, help="folder with images/, masks/, ROIs/ (default data_process/<name>)")
    parser.add_argument("--img-format", help="image extension, e.g. .jpg (default: the registry's, else any image)")
    parser.add_argument("--mask-format", help="mask extension, e.g. .png (default: the registry's, else any image)")
    parser.add_argument("--keywords", help="what the masks show, e.g. 'polyp area'; multi-class: one per category, comma-separated")
    parser.add_argument("--describer", choices=["llava", "geometry", "hybrid"], default="llava", help="see above")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="what runs the model: transformers (this venv), or the vLLM engine (run get_text.py with "
                             "the vLLM venv's Python: make vllm-venv, then .venv-vllm/bin/python get_text.py ...)")
    parser.add_argument("--tensor-parallel", type=int, default=1,
                        help="vllm: GPUs one copy of the model is split over (a divisor of its attention heads)")
    parser.add_argument("--batch-size", type=int, help="ROIs per generate() call (default 8; vllm: 256, which it batches as it goes)")
    parser.add_argument("--max-retries", type=int, default=5, help="answers drawn per ROI at most before the geometry fallback")
    parser.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                        help="weights on GPU (auto: bfloat16 where supported, else float16; CPU: float32; "
                             "with --quantize: the 16-bit parts, float16 for 8bit)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, help="CSV to write (default text_file/<name>/<name>_text_out.csv)")
    parser.add_argument("--no-constrain", dest="constrain", action="store_false", help="free sampling as the paper (validated, retried) instead of JSON-grammar decoding")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (paper: 512)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (paper: 0.2; 0 = greedy)")
    parser.add_argument("--overwrite", action="store_true", help="remove the results of earlier runs and describe every ROI again")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 256 if args.backend == "vllm" else 8
    if args.tensor_parallel != 1 and args.backend != "vllm":
        parser.error("--tensor-parallel needs --backend vllm (transformers spreads the model over every visible GPU)")
    if args.quantize != "none" and args.backend == "vllm":
        parser.error("--quantize needs --backend transformers (vLLM runs the checkpoint's own precision)")
    if args.tensor_parallel < 1 or args.batch_size < 1 or args.max_retries < 1 or args.max_new_tokens < 1:
        parser.error("--tensor-parallel, --batch-size, --max-retries and --max-new-tokens must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = text_stage.run(text_stage.Job(**vars(args)))
    if summary is None:  # not the main process: it only described its shard
        return
    sources = Counter(summary.table["source"])
    tries = summary.table["tries"].astype(int)
    print(f"{len(summary.table)} rows ({summary.earlier} from earlier runs) by {summary.processes} process(es); "
          f"sources: {dict(sources)}; tries: total {tries.sum()}, max {tries.max()}; "
          f"fallbacks to geometry: {sources.get('fallback', 0)}", file=sys.stderr)
    print(f"text CSV written to {summary.out}")


if __name__ == "__main__":
    run_cli(main)
