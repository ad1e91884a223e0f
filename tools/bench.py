"""CoTexNet benchmark on this machine: a training step, evaluation, validation with and without the
frozen-feature cache, peak memory and checkpoint size; then stage 2's text generation.

Segmentation: the real-size CLIPSeg architecture (CIDAS/clipseg-rd64-refined: ViT-B/16, 224 px)
with random weights, built offline, and CoTexNet on it, on synthetic batches (image, ROI, prompt).
Configurations: this code in fp32 and, where train.py picks it, in bf16 (the frozen CLIP cast
once, the rest under autocast); the paper's computation on the same weights
(`model.paper_like.PaperLikeCoTexNet`, fp32: the paper's AMP is CUDA-only); and the frozen ViT
forward alone, the floor of a training step. They take turns round by round, so that a changing
load weighs on all alike; peak RSS is measured in a child process per configuration. The table
also prints the paper code's own figures, for reference.

Text generation: ROIs/s of the tiny random LLaVA, batch 1 unconstrained (the paper's way) vs one
batched grammar-constrained call; then ROIs/s, peak RSS and weight size per get_text.py
--quantize mode (a child process each), and the weights of LLaVA-1.5-13B per mode, computed from
its parameter counts. `--vllm` times only stage 2's two backends instead: transformers batched vs
the vLLM engine (a child process under the vLLM venv's Python).

Run: `make bench` (`make bench BENCH_ARGS=--quick` for a smoke run), `make bench-vllm` for
`--vllm`. The load average is printed with the table: on a shared machine, compare the ratios.
"""

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import CoTexNetError, run_cli
from train_utils.precision import cpu_has_native_bf16

# The rest of the project is imported where it is used: the vLLM child runs this file in the vLLM
# venv, which has none of the segmentation's packages.

# The paper's code on this kind of machine (2 threads, batch 4, real size, fp32, quiet).
PAPER = dict(train_step=1.80, eval_forward=0.22, val_pass=0.27, peak_rss_gb=3.16, checkpoint_mb=982,
             params_m=238.8, trained_m=3.36)
PROMPTS = ["1 round small pink polyp area, located in the center of the image.",
           "2 irregular large red polyp areas, located in the top left of the image.",
           "1 oval medium pink polyp area, located in the bottom right of the image.",
           "1 irregular small white polyp area, located in the left of the image."]
KEYWORD = "polyp area"
QUANTIZE_MODES = ("none", "8bit", "4bit")


# --- measuring -------------------------------------------------------------------------------

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: after fork and exec, ru_maxrss
    still counts the parent's memory."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, *arguments) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*arguments)
    return time.perf_counter() - start, result


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions taking turns within a round, so that
    a changing machine load weighs on all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    return times


def in_child(flags: list, what: str, python: str = sys.executable, env: dict | None = None) -> dict | None:
    """This script in a child process, `flags` naming its job: its last JSON line, or None when it fails."""
    done = subprocess.run([python, __file__, *map(str, flags)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        progress(f"{what}: child failed ({(done.stderr.strip().splitlines() or ['no output'])[-1]})")
        return None
    return json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _f(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# --- segmentation ----------------------------------------------------------------------------

def default_dtype() -> str:
    """The precision train.py picks on this CPU (train_utils.precision.make_accelerator with TRAIN.amp on)."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_of(kind: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if kind == "bf16" else contextlib.nullcontext()


def synthetic_batch(tokenizer, batch: int, size: int, seed: int) -> dict:
    """Images, ROIs (image x mask), labels, and prompts padded to the longest, as training pads them."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels, pixels = [], []
    for _ in range(batch):
        cy, cx, ry, rx = (torch.randint(size // 4, 3 * size // 4, (2,), generator=gen).tolist()
                          + torch.randint(size // 10, size // 4, (2,), generator=gen).tolist())
        labels.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).long())
        pixels.append(torch.randn(3, size, size, generator=gen))
    label, pixel_values = torch.stack(labels), torch.stack(pixels)
    prompts = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], padding=True, return_tensors="pt")
    return dict(pixel_values=pixel_values, roi_pixel_values=pixel_values * (label[:, None] > 0), label=label,
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"])


def prompt_of(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Segmentation:
    """The real-size (or, --quick, tiny) CLIPSeg config and a training batch. Configurations:
    "fp32", "bf16" (the frozen CLIP cast once, as train.py does) and "paper" (PaperLikeCoTexNet)."""

    def __init__(self, args):
        from model.tiny import clip_tokenizer, real_size_clipseg_config, tiny_clipseg_config

        self.config = tiny_clipseg_config() if args.quick else real_size_clipseg_config()
        self.size = self.config.vision_config.image_size
        self.tokenizer = clip_tokenizer()
        self.batch = synthetic_batch(self.tokenizer, args.batch, self.size, seed=1)
        self.kinds = ["fp32", "bf16"] if args.dtype == "bf16" else ["fp32"]
        self.chosen = args.dtype

    def model(self, kind: str):
        """A model of configuration `kind`, built as train.py builds it: every kind the same weights."""
        from model.CoTexNet import CoTexNet
        from model.paper_like import PaperLikeCoTexNet
        from model.tiny import build_clipseg

        model = (PaperLikeCoTexNet if kind == "paper" else CoTexNet).from_clipseg(build_clipseg(self.config, seed=0))
        if kind == "bf16":
            model.cast_frozen_encoder(torch.bfloat16)
        return model


def training_step(model, kind: str, batch: dict):
    """One training step: forward (image, ROI, prompt) under the configuration's autocast, AdamW."""
    from train_utils.losses import CoTexNetLoss

    criterion = CoTexNetLoss(2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-4)

    def run():
        model.train()
        with autocast_of(kind):
            losses = criterion(model(batch["pixel_values"], batch["roi_pixel_values"], **prompt_of(batch)),
                               batch["label"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
    return run


def vit_floor(model, kind: str, batch: dict):
    """The frozen ViT forward alone over a step's images (image and ROI): what no code can skip."""
    images = torch.cat([batch["pixel_values"], batch["roi_pixel_values"]])

    @torch.no_grad()
    def run():
        with autocast_of(kind):
            model.encode_images(images)
    return run


def evaluation(model, kind: str, batches: list[dict], with_metrics: bool = False):
    """The evaluation forward over `batches` (the paper-like one is given the prompt: its
    evaluation runs the text encoder), then validation's per-image metrics if `with_metrics`."""
    from model.CoTexNet import predict_labels
    from train_utils.metrics import image_metrics

    @torch.no_grad()
    def run():
        model.eval()
        for b in batches:
            with autocast_of(kind):
                out = model(b["pixel_values"], **(prompt_of(b) if kind == "paper" else {}))
            if with_metrics:
                image_metrics(predict_labels(out.logits.float()), b["label"], 2, hd95=False)
    return run


class CachedValidation:
    """Validation as train_utils.loops.evaluate runs it: frozen features from the cache (outside
    autocast), the decoder under autocast, per-image metrics. After `reset` the cache is empty: the
    next pass is a first epoch."""

    def __init__(self, model, kind: str, batches: list[dict], size: int, folder: Path):
        self.model, self.kind, self.batches, self.size, self.folder = model, kind, batches, size, folder
        # The cache keys name image files (path, size, mtime): stand-ins for the validation images.
        self.paths = [[folder / f"val_{i}_{j}.jpg" for j in range(len(b["label"]))] for i, b in enumerate(batches)]
        for path in (p for group in self.paths for p in group):
            path.write_bytes(path.name.encode())
        self.reset()

    def reset(self) -> None:
        from model.feature_cache import FeatureCache

        self.cache = FeatureCache(self.model, self.size, folder=self.folder / "cache")

    @torch.no_grad()
    def __call__(self) -> None:
        from model.CoTexNet import predict_labels
        from train_utils.metrics import image_metrics

        self.model.eval()
        for b, group in zip(self.batches, self.paths, strict=True):
            features = self.cache.features(self.model, b["pixel_values"], group)
            with autocast_of(self.kind):
                out = self.model.forward_features(features)
            image_metrics(predict_labels(out.logits.float()), b["label"], 2, hd95=False)


def check_same_function(seg: Segmentation, models: dict) -> list[str]:
    """The timed configurations compute the same function: the paper-like logits equal ours, and
    bf16's are within 1e-2 of fp32's (of the largest logit)."""
    b, notes = seg.batch, []
    with torch.no_grad():
        ref = models["fp32"].train()(b["pixel_values"], b["roi_pixel_values"], **prompt_of(b)).logits
        if "paper" in models:
            like = models["paper"].train()(b["pixel_values"], b["roi_pixel_values"], **prompt_of(b)).logits
            notes.append(f"check: this code's training forward equals the paper-like one (max logit difference "
                         f"{_rel(like, ref):.1e} of the largest logit)")
        if "bf16" in models:
            with autocast_of("bf16"):
                half = models["bf16"].train()(b["pixel_values"], b["roi_pixel_values"], **prompt_of(b)).logits
            notes.append(f"check: bf16 (CLIP cast once) vs fp32 logits: max difference {_rel(half, ref):.1e} of the "
                         f"largest logit (bound 1e-2: {'met' if _rel(half, ref) <= 1e-2 else 'EXCEEDED'})")
    return notes


def time_training(seg: Segmentation, models: dict, args, extra_steps: dict) -> dict[str, list[float]]:
    """Seconds per round of each configuration's training step (and `extra_steps`) and of the ViT floor."""
    steps = {kind: training_step(model, kind, seg.batch) for kind, model in models.items()} | extra_steps
    floors = {f"floor_{kind}": vit_floor(models[kind], kind, seg.batch) for kind in seg.kinds}
    progress(f"training: {args.warmup} warm-up + {args.steps} timed rounds of {', '.join(steps)} and the ViT floor")
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    return interleaved(steps | floors, args.steps)


def time_compiled_step(seg: Segmentation):
    """The chosen configuration's step with torch.compile (TRAIN.compile), and its first call's seconds."""
    progress(f"torch.compile of the {seg.chosen} model's frozen encoder and decoder")
    model = seg.model(seg.chosen)
    model.compile_parts()
    step = training_step(model, seg.chosen, seg.batch)
    return step, timed(step)[0]


def time_evaluation(seg: Segmentation, models: dict, args) -> tuple[dict[str, list[float]], str]:
    """Seconds per round of each configuration's evaluation forward, of validation in the chosen one (first
    epoch, then cached) and of the paper-like evaluation without and with metrics; the cache's dtype."""
    batches = [synthetic_batch(seg.tokenizer, args.batch, seg.size, seed=100 + i) for i in range(args.val_batches)]
    repeats = max(2, args.steps // 4)
    progress(f"evaluation and validation: {repeats} rounds over {len(batches) * args.batch} images")
    with tempfile.TemporaryDirectory() as tmp:
        validation = CachedValidation(models[seg.chosen], seg.chosen, batches, seg.size, Path(tmp))
        validation()  # warm-up of the cached path's allocations
        rounds = {f"eval_{kind}": evaluation(models[kind], kind, batches) for kind in seg.kinds}
        rounds.update(new_cache=validation.reset, cold=validation, cached=validation, cached2=validation)
        if "paper" in models:
            rounds.update(paper_eval=evaluation(models["paper"], "paper", batches),
                          paper_val=evaluation(models["paper"], "paper", batches, with_metrics=True))
        times = interleaved(rounds, repeats)
    times["cached"] += times.pop("cached2")
    return times, str(validation.cache.dtype).removeprefix("torch.")


def rss_of_training(args) -> None:
    """Child process: peak RSS (whole process) of `args.rss_of`'s training: warm-up and two steps."""
    seg = Segmentation(args)
    run = training_step(seg.model(args.rss_of), args.rss_of, seg.batch)
    for _ in range(args.warmup + 2):
        run()
    print(json.dumps(dict(peak_rss_gb=peak_rss_gb())))


def rss_in_child(args, kind: str) -> float | None:
    flags = ["--rss-of", kind, "--batch", args.batch, "--threads", args.threads, "--warmup", args.warmup]
    result = in_child(flags + (["--quick"] if args.quick else []), f"peak RSS of {kind}")
    return result and result["peak_rss_gb"]


def segmentation_rows(args, seg: Segmentation, train: dict, evals: dict, rss: dict, ckpt_mb: float,
                      params: tuple[float, float]) -> list[tuple]:
    """The table: a row per figure, a column per configuration, the paper code's figures, the targets."""
    med, kinds, chosen, n_val = statistics.median, seg.kinds, seg.chosen, args.val_batches * args.batch
    step = {kind: med(times) for kind, times in train.items() if not kind.startswith("floor_")}
    floor = {kind: med(train[f"floor_{kind}"]) for kind in kinds}
    ev = {kind: med(evals[f"eval_{kind}"]) / n_val for kind in kinds}
    paper_eval, paper_val = (med(evals[k]) / n_val if k in evals else None for k in ("paper_eval", "paper_val"))
    paper = PAPER if not args.quick else {}
    best, like_step = step[kinds[-1]], step.get("paper")

    def cells(values: dict, digits: int = 3) -> list[str]:
        return [_f(values.get(kind), digits) for kind in kinds]

    def chosen_only(text: str) -> list[str]:
        return [text if kind == chosen else "" for kind in kinds]

    def target(text: str, ok: bool, measured: str) -> str:
        return f"{text}: {'met' if ok else 'MISSED'}, {measured}"

    def spread(times):
        return f"{min(times):.2f}..{max(times):.2f}" if times else ""

    return [
        ("train step (s, median)", *cells(step), _f(like_step), _f(paper.get("train_step")),
         target(">= 3x paper-like", like_step / best >= 3, f"{like_step / best:.2f}x") if like_step else ""),
        ("  spread (min..max)", *[spread(train[kind]) for kind in kinds], spread(train.get("paper")), "", ""),
        ("frozen ViT forward alone (s)", *cells(floor), "", "",
         target("step <= 1.5x floor", best / floor[kinds[-1]] <= 1.5, f"{best / floor[kinds[-1]]:.2f}x")),
        ("samples/s (training)", *[_f(args.batch / step[kind], 2) for kind in kinds],
         _f(args.batch / like_step if like_step else None, 2), _f(args.batch / PAPER["train_step"] if paper else None, 2),
         ""),
        ("eval forward (s/image)", *cells(ev), _f(paper_eval), _f(paper.get("eval_forward")),
         target(">= 3x paper-like", paper_eval / ev[kinds[-1]] >= 3, f"{paper_eval / ev[kinds[-1]]:.2f}x")
         if paper_eval else ""),
        (f"validation, 1st epoch, {chosen} (s/image)", *chosen_only(_f(med(evals["cold"]) / n_val)), _f(paper_val),
         _f(paper.get("val_pass")), ""),
        (f"validation, cached, {chosen} (s/image)", *chosen_only(_f(med(evals["cached"]) / n_val, 4)), _f(paper_val),
         _f(paper.get("val_pass")), ""),
        ("peak RSS, training (GB)", *cells(rss, 2), _f(rss.get("paper"), 2), _f(paper.get("peak_rss_gb"), 2),
         target("<= 0.75x paper-like", rss[kinds[-1]] / rss["paper"] <= 0.75, f"{rss[kinds[-1]] / rss['paper']:.2f}x")
         if rss.get("paper") and rss[kinds[-1]] else ""),
        ("checkpoint (MB)", *chosen_only(f"{ckpt_mb:.1f}"), "", _f(paper.get("checkpoint_mb"), 0), ""),
        ("parameters (M), trained", *chosen_only(f"{params[0]:.1f}, {params[1]:.2f}"), "",
         f"{PAPER['params_m']}, {PAPER['trained_m']}" if paper else "", ""),
    ]


def bench_segmentation(args) -> tuple[list[tuple], list[str]]:
    seg = Segmentation(args)
    models = {kind: seg.model(kind) for kind in seg.kinds + (["paper"] if args.baseline else [])}
    notes = [f"prompt tokens per batch: {seg.batch['input_ids'].shape[1]} (padded to the longest), "
             f"paper-like: {seg.config.text_config.max_position_embeddings}", *check_same_function(seg, models)]
    compiled = time_compiled_step(seg) if args.compile else None
    train = time_training(seg, models, args, {"compiled": compiled[0]} if compiled else {})
    evals, cache_dtype = time_evaluation(seg, models, args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = models[seg.chosen].save_pretrained(Path(tmp) / "ckpt")
        ckpt_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    progress("peak RSS: one child process per configuration")
    rss = {kind: rss_in_child(args, kind) for kind in models}
    parameters = list(models["fp32"].parameters())
    params = (sum(p.numel() for p in parameters) / 1e6, sum(p.numel() for p in parameters if p.requires_grad) / 1e6)
    rows = segmentation_rows(args, seg, train, evals, rss, ckpt_mb, params)

    ev = {kind: statistics.median(evals[f"eval_{kind}"]) for kind in seg.kinds}
    if "bf16" in ev:
        notes.append(f"bf16 eval forward vs fp32: {ev['fp32'] / ev['bf16']:.2f}x faster "
                     f"({'not slower: met' if ev['bf16'] <= ev['fp32'] else 'SLOWER'})")
    if compiled:
        step, eager = statistics.median(train["compiled"]), statistics.median(train[seg.chosen])
        notes.append(f"torch.compile ({seg.chosen}, encoder and decoder): first step {compiled[1]:.1f} s "
                     f"(compilation), then {step:.3f} s vs {eager:.3f} s eager ({eager / step:.2f}x)")
    notes.append(f"validation: {args.val_batches * args.batch} images in batches of {args.batch}, tensors in memory "
                 f"(image decoding excluded); metrics without HD95 as during training; cache stores {cache_dtype}")
    notes.append("peak RSS: a child process per configuration builds the model as train.py does (float32, then "
                 "the CLIP cast for bf16) and trains; the paper-like one holds the paper's second vision encoder")
    return rows, notes


def print_segmentation(args) -> None:
    rows, notes = bench_segmentation(args)
    ours = ["this code, fp32"] + (["this code, bf16"] if args.dtype == "bf16" else [])
    header = ("", *ours, "paper-like fp32", "paper code", "target (bf16 column where there is one)")
    widths = [38, *[17] * len(ours), 17, 12, 42]
    print()
    for row in [header, tuple("-" * (w - 1) for w in widths), *rows]:
        print("".join(f"{cell:<{w}}" if i in (0, len(row) - 1) else f"{cell:>{w - 1}} "
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    print("paper-like: the paper's computation timed on the same weights in this run, alternating with ours "
          "(see --help); paper code: its own figures on a quiet machine with native bf16; frozen ViT forward "
          "alone: this code's encoder over a step's 2 x batch images, the floor of a step")
    print(*notes, sep="\n")


# --- text generation -------------------------------------------------------------------------

def valid(answers) -> int:
    """How many answers parse as the five attributes."""
    from llava_inference.attributes import AnswerError, parse_answer

    ok = 0
    for answer in answers:
        with contextlib.suppress(AnswerError):
            parse_answer(answer, 3)
            ok += 1
    return ok


def random_images(count: int, varied: bool = False) -> list[np.ndarray]:
    """The ROIs generation is timed on (`varied`: of several heights, as in --vllm, the same in its child)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + i % 5 * 8 if varied else 64, 64, 3), dtype=np.uint8) for i in range(count)]


def bench_text(args) -> list[str]:
    """ROIs/s of the tiny LLaVA: batch 1 unconstrained (the paper's way) vs batched constrained."""
    try:
        from llava_inference.transformers_backend import TransformersDescriber
        from model.tiny import save_tiny_llava
    except ImportError as err:
        return [f"text generation: skipped ({err})"]
    from transformers.utils import logging

    logging.disable_progress_bar()
    images, n1 = random_images(args.llava_batch), args.llava_single

    def one_by_one(describer):
        return [describer.generate([images[i]], [KEYWORD])[0] for i in range(n1)]

    progress(f"text generation: {n1} ROIs one by one (twice), {len(images)} in one batch")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(Path(tmp) / "llava")
        free = TransformersDescriber(path, constrain=False, max_new_tokens=args.max_new_tokens)
        constrained = TransformersDescriber(path, constrain=True, max_new_tokens=args.max_new_tokens)
        free.generate(images[:1], [KEYWORD])  # warm-up
        constrained.generate(images[:2], [KEYWORD] * 2)
        t1, single = timed(one_by_one, free)
        t1c, single_c = timed(one_by_one, constrained)
        tb, batched = timed(constrained.generate, images, [KEYWORD] * len(images))
    r1, r1c, rb = n1 / t1, n1 / t1c, len(images) / tb
    return [f"{'text generation (tiny LLaVA, random weights)':<46}{'ROIs/s':>9}{'valid answers':>15}{'vs batch 1':>12}",
            f"{'batch 1, unconstrained (paper)':<46}{r1:>9.2f}{f'{valid(single)}/{n1}':>15}{'1.0x':>12}",
            f"{'batch 1, constrained':<46}{r1c:>9.2f}{f'{valid(single_c)}/{n1}':>15}{f'{r1c / r1:.1f}x':>12}",
            f"{f'batch {len(images)}, constrained (this code)':<46}{rb:>9.2f}"
            f"{f'{valid(batched)}/{len(images)}':>15}{f'{rb / r1:.1f}x':>12}",
            f"target: batched constrained >= 4x batch 1: {'met' if rb >= 4 * r1 else 'MISSED'}; "
            f"at most {args.max_new_tokens} new tokens, temperature 0.2"]


def text_mode(args) -> None:
    """Child process: the tiny LLaVA at `args.llava_dir` loaded in `args.text_of`, a warm-up call,
    then timed batched constrained calls; peak RSS of the whole process."""
    from llava_inference.transformers_backend import TransformersDescriber

    mode = args.text_of
    describer = TransformersDescriber(args.llava_dir, quantize=mode, dtype="bfloat16" if mode == "none" else "auto",
                                      max_new_tokens=args.max_new_tokens)
    images = random_images(args.llava_batch)
    keywords = [KEYWORD] * len(images)
    describer.generate(images[:2], keywords[:2])
    times = [timed(describer.generate, images, keywords)[0] for _ in range(args.text_rounds)]
    print(json.dumps(dict(rois_per_s=len(images) / statistics.median(times), peak_rss_gb=peak_rss_gb(),
                          weight_mb=describer.model.get_memory_footprint(return_buffers=False) / 2**20)))


def bench_text_quantized(args) -> list[str]:
    """ROIs/s, peak RSS and weight size of the tiny LLaVA in bf16, 8bit and 4bit (a child process
    each, one after the other), and the weights of LLaVA-1.5-13B in each mode from its parameter counts."""
    from transformers import LlavaForConditionalGeneration

    from llava_inference.quantization import weight_bytes
    from model.tiny import real_size_llava_config, save_tiny_llava

    progress(f"text generation per --quantize mode: {args.text_rounds} batched calls of {args.llava_batch} ROIs each")
    names = {"none": "bf16", "8bit": "8bit", "4bit": "4bit (nf4)"}
    lines = [f"{'tiny LLaVA (widths 64), batched constrained':<46}{'ROIs/s':>9}{'peak RSS (GB)':>15}{'weights (MB)':>14}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_llava(Path(tmp) / "llava", width=64)
        for mode in QUANTIZE_MODES:
            result = in_child(["--text-of", mode, "--llava-dir", folder, "--llava-batch", args.llava_batch, "--text-rounds",
                               args.text_rounds, "--max-new-tokens", args.max_new_tokens, "--threads", args.threads],
                              f"--quantize {mode}")
            if result:
                lines.append(f"{names[mode]:<46}{result['rois_per_s']:>9.2f}{result['peak_rss_gb']:>15.2f}"
                             f"{result['weight_mb']:>14.3f}")
    with torch.device("meta"):
        real = LlavaForConditionalGeneration(real_size_llava_config())
    text = real.config.text_config
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    params = sum(p.numel() for p in real.parameters()) / 1e9
    lines.append(f"LLaVA-1.5-13B weights ({params:.2f} B parameters, computed): " + ", ".join(
        f"{names[mode]} {weight_bytes(real, mode) / 1e9:.1f} GB" for mode in QUANTIZE_MODES)
        + f"; KV cache {kv / 2**20:.2f} MiB per token in 16 bits")
    lines.append("the processes run one after the other (not interleaved): compare the ratios on a quiet machine; "
                 "at this size the peak RSS is the runtime's (torch, transformers, bitsandbytes), not the weights'")
    return lines


def vllm_worker(args) -> None:
    """Child process in the vLLM venv: engine start, then one generate() over every ROI; JSON on stdout."""
    from llava_inference.vllm_describer import VllmDescriber

    started, describer = timed(lambda: VllmDescriber(args.vllm_worker, temperature=0, max_new_tokens=args.max_new_tokens))
    rois = random_images(args.vllm_rois, varied=True)
    describer.generate(rois[:2], [KEYWORD] * 2)  # warm-up
    seconds, answers = timed(describer.generate, rois, [KEYWORD] * len(rois))
    print(json.dumps({"start_s": started, "seconds": seconds, "answers": answers}))


def bench_vllm(args) -> list[str]:
    """ROIs/s of get_text's two backends on the tiny LLaVA that both load, constrained and greedy:
    transformers in batches (get_text's --batch-size) and in one call, vLLM (a child process under
    the vLLM venv's Python) in one call, which it batches as it goes."""
    from llava_inference.transformers_backend import TransformersDescriber
    from model.tiny_vllm import save_tiny_vllm_llava

    python = Path(args.vllm_python)
    if not python.is_file():
        raise CoTexNetError(f"--vllm-python {python}: no such file; build the vLLM venv with `make vllm-venv`")
    rois, size = random_images(args.vllm_rois, varied=True), args.llava_batch

    def in_batches(describer):
        return [answer for i in range(0, len(rois), size)
                for answer in describer.generate(rois[i:i + size], [KEYWORD] * len(rois[i:i + size]))]

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_vllm_llava(Path(tmp) / "llava")
        progress(f"transformers: {len(rois)} ROIs in batches of {size}, then in one call")
        load_s, describer = timed(lambda: TransformersDescriber(path, temperature=0, max_new_tokens=args.max_new_tokens))
        describer.generate(rois[:2], [KEYWORD] * 2)  # warm-up
        t_batched, batched = timed(in_batches, describer)
        t_one, one_call = timed(describer.generate, rois, [KEYWORD] * len(rois))
        del describer
        progress(f"vLLM ({python}): engine start, then {len(rois)} ROIs in one call")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_CPU_OMP_THREADS_BIND="nobind")
        engine = in_child(["--vllm-worker", path, "--vllm-rois", len(rois), "--max-new-tokens", args.max_new_tokens],
                          "the vLLM engine", python=str(python), env=env)
        if engine is None:
            raise CoTexNetError(f"--vllm-python {python}: the vLLM child process failed (its last line is above)")
    n = len(rois)
    same, valid_vllm = sum(a == b for a, b in zip(engine["answers"], one_call, strict=True)), valid(engine["answers"])
    r_batched, r_one, r_vllm = n / t_batched, n / t_one, n / engine["seconds"]
    return [f"{'text generation, tiny LLaVA (random), greedy, constrained':<50}{'ROIs/s':>9}{'valid':>9}{'vs batched':>12}"
            f"{'start (s)':>11}",
            f"{f'transformers, batches of {size}':<50}{r_batched:>9.2f}{f'{valid(batched)}/{n}':>9}{'1.0x':>12}"
            f"{load_s:>11.1f}",
            f"{f'transformers, {n} in one call':<50}{r_one:>9.2f}{f'{valid(one_call)}/{n}':>9}{f'{r_one / r_batched:.1f}x':>12}"
            f"{load_s:>11.1f}",
            f"{f'vLLM {n} in one call (continuous batching)':<50}{r_vllm:>9.2f}{f'{valid_vllm}/{n}':>9}"
            f"{f'{r_vllm / r_batched:.1f}x':>12}{engine['start_s']:>11.1f}",
            f"answers equal to transformers' (one call): {same}/{n}; at most {args.max_new_tokens} new tokens; "
            "start: loading the model (vLLM: the engine, its processes and warm-up)"]


# --- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="training and evaluation batch size (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=default_dtype(),
                        help="bf16: time it beside fp32 (the frozen CLIP cast once, the rest under autocast; fast "
                             f"only on CPUs with native bf16: AVX-512 BF16, AMX); default: what train.py picks on "
                             f"this CPU ({default_dtype()})")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10; median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches per pass (default 4)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the paper-like path (halves the run time)")
    parser.add_argument("--no-text", dest="text", action="store_false", help="skip the text-generation tables")
    parser.add_argument("--text-only", dest="segmentation", action="store_false",
                        help="only the text-generation tables (LLaVA batched vs batch 1, and per --quantize mode)")
    parser.add_argument("--llava-single", type=int, default=4, help="ROIs generated one by one (default 4)")
    parser.add_argument("--llava-batch", type=int, default=16, help="ROIs in the batched call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation limit (default 512, the paper's)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the model with torch.compile (TRAIN.compile) and report its first-step cost")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test of this script")
    parser.add_argument("--text-rounds", type=int, default=3, help="timed batched calls per --quantize mode (default 3)")
    parser.add_argument("--vllm", action="store_true",
                        help="time only stage 2's backends on the tiny LLaVA: transformers vs vLLM (make bench-vllm)")
    parser.add_argument("--vllm-python", default=str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"),
                        help="the vLLM venv's Python (default .venv-vllm/bin/python: make vllm-venv)")
    parser.add_argument("--vllm-rois", type=int, default=64, help="ROIs per backend with --vllm (default 64)")
    # the jobs of the child processes
    parser.add_argument("--rss-of", choices=["fp32", "bf16", "paper"], help=argparse.SUPPRESS)
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    parser.add_argument("--text-of", choices=QUANTIZE_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--llava-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.steps, args.warmup, args.val_batches, args.llava_single, args.llava_batch,
           args.text_rounds, args.vllm_rois) < 1:
        raise CoTexNetError("--batch, --threads, --steps, --warmup, --val-batches, --llava-*, --text-rounds, --vllm-rois: "
                            "must be >= 1")
    if args.quick:
        args.steps, args.warmup, args.val_batches = min(args.steps, 3), min(args.warmup, 1), min(args.val_batches, 2)
        args.llava_single, args.llava_batch, args.max_new_tokens = 2, 4, min(args.max_new_tokens, 64)
        args.text_rounds = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    child = rss_of_training if args.rss_of else text_mode if args.text_of else vllm_worker if args.vllm_worker else None
    if child:
        child(args)
        return
    if args.vllm:
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads; at start {load()}", flush=True)
        print(*bench_vllm(args), sep="\n")
        print(f"\nat end: {load()}")
        return

    import transformers

    size = "tiny" if args.quick else "real size (CIDAS/clipseg-rd64-refined architecture, random weights)"
    chosen = "what train.py picks on this CPU" if args.dtype == default_dtype() else f"train.py picks {default_dtype()}"
    if args.segmentation:
        print(f"settings: {size}, batch {args.batch}, {args.threads} threads, precision {args.dtype} ({chosen}), "
              f"224 px, {args.steps} timed rounds after {args.warmup} warm-up")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}), transformers {transformers.__version__}; at start {load()}", flush=True)
    if args.segmentation:
        print_segmentation(args)
    if args.text:
        print("", *bench_text(args), "", *bench_text_quantized(args), sep="\n")
    print(f"\nat end: {load()}")


if __name__ == "__main__":
    run_cli(main)
