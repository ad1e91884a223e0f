"""CoTexNet benchmark: training step, evaluation, validation with and without the frozen-feature
cache, peak memory, checkpoint size, and stage-2 text generation, on this machine.

Builds the real-size CLIPSeg architecture (CIDAS/clipseg-rd64-refined: ViT-B/16, 224 px) with
random weights offline, CoTexNet on it, and times it on synthetic batches (image, ROI, a
prompt of ~19 tokens). Beside this code's figures it times a "paper-like" path on the same
model in the same process: the computation the paper's code does (image and ROI through the
vision encoder in two calls, every layer in full, prompts padded to 77 tokens, the text
encoder also on the evaluation path), so that the speed-up is measured under the same load;
and it prints the paper code's own figures (quiet machine of this kind) for reference.

Text generation: ROIs/s of the tiny random LLaVA, batch 1 unconstrained (the paper's way)
vs one batched grammar-constrained call; then ROIs/s, peak RSS and weight size of a tiny LLaVA
with quantisable widths in bf16, 8bit and 4bit (get_text.py --quantize), a child process each,
and the weights of LLaVA-1.5-13B in each mode computed from its parameter counts. `--vllm` times
only stage 2's two backends instead (transformers batched vs the vLLM engine, which runs in a
child process under the vLLM venv).

In one run: this code in fp32 and, on a CPU with native bf16 (what train.py then picks), in bf16
with the frozen CLIP cast once, beside the paper-like computation in fp32 (the paper's AMP is
CUDA-only) and the frozen ViT forward alone (the floor of a training step); peak RSS of each
configuration's training, each measured in a child process of its own.

Run: `make bench`, or `python tools/bench.py [--quick] [--batch 4] [--threads 2] [--dtype bf16]`;
`make bench-vllm` for `--vllm`.
Timings are medians of rounds in which the configurations take turns; on a shared machine they
vary with its load (printed with the table): compare the ratios.
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import CoTexNetError, run_cli
from train_utils.precision import cpu_has_native_bf16

# The paper's code on this kind of machine (2 threads, batch 4, real size, fp32, quiet).
PAPER = dict(train_step=1.80, eval_forward=0.22, val_pass=0.27, peak_rss_gb=3.16, checkpoint_mb=982,
             params_m=238.8, trained_m=3.36)
PROMPTS = ["1 round small pink polyp area, located in the center of the image.",
           "2 irregular large red polyp areas, located in the top left of the image.",
           "1 oval medium pink polyp area, located in the bottom right of the image.",
           "1 irregular small white polyp area, located in the left of the image."]


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


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions taking turns within a round, so that
    a changing machine load weighs on all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def synthetic_batch(tokenizer, batch: int, size: int, seed: int, pad_to: int | None = None) -> dict:
    """Images, ROIs (image x mask), labels and tokenised prompts, padded as training pads them."""
    from data_process.my_dataset import collate
    from model.CoTexNet import ROI_POSITION

    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for i in range(batch):
        cy, cx, ry, rx = (torch.randint(size // 4, 3 * size // 4, (2,), generator=gen).tolist()
                          + torch.randint(size // 10, size // 4, (2,), generator=gen).tolist())
        label = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).long()
        pixels = torch.randn(3, size, size, generator=gen)
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], padding="max_length" if pad_to else False,
                        max_length=pad_to)["input_ids"]
        items.append(dict(pixel_values=pixels, label=label, roi_pixel_values=pixels * (label > 0),
                          input_ids=torch.tensor(ids), name=f"img_{i}.jpg", orig_size=(size, size)))
    out = collate(items, tokenizer.pad_token_id, ROI_POSITION)
    if pad_to:  # the paper's padding: attention on the prompt only, sequence of 77
        out["attention_mask"] = (out["input_ids"] != tokenizer.pad_token_id).long()
        out["attention_mask"][:, 0] = 1
        eos = (out["input_ids"] == tokenizer.eos_token_id).int().argmax(dim=1)
        out["attention_mask"][torch.arange(batch), eos] = 1
    return out


def paper_like_forward(model, batch: dict, train: bool, roi_vision=None):
    """The paper's computation on our model: two full vision calls (the ROI's through
    `roi_vision`, the paper's second copy of the encoder, when given), 77-token text, and on the
    evaluation path the text encoder too (its result unused, as in the paper's code)."""
    from model.CoTexNet import CoTexNetOutput

    vision = model.clip.vision_model
    with torch.no_grad():
        image = vision(batch["pixel_values"], output_hidden_states=True)
        roi = (roi_vision or vision)(batch["roi_pixel_values"], output_hidden_states=True) if train else None
    activations = [image.hidden_states[i + 1] for i in model.extract_layers]
    img_embedding = model.img2text(image.last_hidden_state[:, 0])
    if train:
        roi_embedding = model.roi_mapper(roi.last_hidden_state[:, 0])
        text = torch.sigmoid(model.text_features(batch["input_ids"], batch["attention_mask"], roi_embedding))
        cond = (1 - model.alpha) * text + model.alpha * img_embedding
    else:
        text = torch.sigmoid(model.text_features(batch["input_ids"], batch["attention_mask"]))
        cond = img_embedding
    condition = cond * model.var + model.mean
    logits = model.decoder(activations, condition).logits
    logits = logits.unsqueeze(1) if logits.dim() == 3 else logits
    return CoTexNetOutput(logits, img_embedding, text.detach() if train else None, condition)


def default_dtype() -> str:
    """The precision train.py picks on this CPU (train_utils.precision.make_accelerator with TRAIN.amp on)."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast_of(dtype: str):
    return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext


class Setup:
    """The real-size (or tiny) model, its data and the training-step closures of one configuration:
    "fp32", "bf16" (the frozen CLIP cast once, the rest under autocast, as train.py does) or
    "paper" (the paper-like computation, fp32: the paper's AMP is CUDA-only)."""

    def __init__(self, args):
        from model.CoTexNet import CoTexNet
        from model.tiny import build_clipseg, clip_tokenizer, real_size_clipseg_config, tiny_clipseg_config
        from train_utils.losses import CoTexNetLoss

        self.config = tiny_clipseg_config() if args.quick else real_size_clipseg_config()
        self.size = self.config.vision_config.image_size
        self.base = lambda: CoTexNet.from_clipseg(build_clipseg(self.config, seed=0))
        self.tokenizer = clip_tokenizer()
        self.criterion = CoTexNetLoss(2)
        self.batch = synthetic_batch(self.tokenizer, args.batch, self.size, seed=1)
        self.padded = synthetic_batch(self.tokenizer, args.batch, self.size, seed=1, pad_to=77)

    def model(self, kind: str, like=None):
        """A fresh model of configuration `kind`, with the weights of `like` when given."""
        model = self.base() if like is None else copy.deepcopy(like)
        if kind == "bf16":
            model.cast_frozen_encoder(torch.bfloat16)
        if kind == "paper":
            model.roi_vision = copy.deepcopy(model.clip.vision_model)  # the paper's second copy
        return model

    def step(self, model, kind: str, compiled=None):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-4)
        autocast = autocast_of("bf16" if kind == "bf16" else "fp32")
        forward = compiled or model
        if kind == "paper":
            def run_forward():
                return paper_like_forward(model, self.padded, True, model.roi_vision)
        else:
            def run_forward():
                return forward(**_model_inputs(self.batch))

        def run():
            model.train()
            with autocast():
                losses = self.criterion(run_forward(), self.batch["label"])
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
        return run

    def floor(self, model, kind: str):
        """The frozen ViT forward alone over a step's images (image and ROI): what no code can skip."""
        images = torch.cat([self.batch["pixel_values"], self.batch["roi_pixel_values"]])
        autocast = autocast_of(kind)

        @torch.no_grad()
        def run():
            with autocast():
                model.encode_images(images)
        return run


def measure_rss(args) -> None:
    """Child process of the bench: peak RSS (whole process, from its start) of `args.rss_of`'s
    training: the model built as train.py builds it, then warm-up and two steps."""
    setup = Setup(args)
    kind = args.rss_of
    model = setup.model(kind)
    run = setup.step(model, kind)
    for _ in range(args.warmup + 2):
        run()
    print(json.dumps(dict(peak_rss_gb=peak_rss_gb())))


def rss_in_child(args, kind: str) -> float | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--rss-of", kind, "--batch", str(args.batch),
               "--threads", str(args.threads), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        notes_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        progress(f"peak RSS of {kind}: child failed ({notes_line})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_gb"]


def bench_segmentation(args, rows: list, notes: list) -> None:
    from model.CoTexNet import predict_labels
    from model.feature_cache import FeatureCache
    from train_utils.metrics import image_metrics

    mixed = args.dtype == "bf16"
    kinds = ["fp32", "bf16"] if mixed else ["fp32"]
    chosen = args.dtype
    setup = Setup(args)
    batch, padded, size = setup.batch, setup.padded, setup.size
    models = {"fp32": setup.base()}
    if mixed:
        models["bf16"] = setup.model("bf16", like=models["fp32"])
    if args.baseline:
        models["paper"] = setup.model("paper", like=models["fp32"])
    notes.append(f"prompt tokens per batch: {batch['input_ids'].shape[1]} (trimmed to the longest), "
                 f"paper-like: {padded['input_ids'].shape[1]}")

    # Same function every way (a check that the timed paths compute the same thing).
    with torch.no_grad():
        ref = models["fp32"](**_model_inputs(batch)).logits
        if args.baseline:
            like = paper_like_forward(models["paper"], padded, True, models["paper"].roi_vision).logits
            notes.append(f"check: this code's training forward equals the paper-like one (max logit difference "
                         f"{_rel(like, ref):.1e} of the largest logit)")
        if mixed:
            with autocast_of("bf16")():
                half = models["bf16"](**_model_inputs(batch)).logits
            notes.append(f"check: bf16 (CLIP cast once) vs fp32 logits: max difference {_rel(half, ref):.1e} of the "
                         f"largest logit (bound 1e-2: {'met' if _rel(half, ref) <= 1e-2 else 'EXCEEDED'})")

    compiled = None
    if args.compile:
        progress(f"torch.compile of the {chosen} model's frozen encoder and decoder")
        models["compiled"] = setup.model(chosen, like=models["fp32"])
        models["compiled"].compile_parts()
        compiled_step = setup.step(models["compiled"], chosen)
        start = time.perf_counter()
        compiled_step()
        compiled = time.perf_counter() - start

    steps = {kind: setup.step(models[kind], kind) for kind in kinds}
    if args.baseline:
        steps["paper"] = setup.step(models["paper"], "paper")
    if args.compile:
        steps["compiled"] = compiled_step
    floors = {f"floor_{kind}": setup.floor(models[kind], kind) for kind in kinds}
    progress(f"training: {args.warmup} warm-up + {args.steps} timed rounds of {', '.join(steps)} and the ViT floor")
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    train = interleaved({**steps, **floors}, args.steps)

    # Evaluation: forward only; validation: forward + prediction + per-image metrics.
    for model in models.values():
        model.eval()
    n_val = args.val_batches * args.batch
    val_batches = [synthetic_batch(setup.tokenizer, args.batch, size, seed=100 + i) for i in range(args.val_batches)]
    val_padded = [synthetic_batch(setup.tokenizer, args.batch, size, seed=100 + i, pad_to=77)
                  for i in range(args.val_batches)]

    def metrics(logits, labels):
        image_metrics(predict_labels(logits.float()), labels, 2, hd95=False)

    def eval_forward(kind):
        @torch.no_grad()
        def run():
            for b in val_batches:
                with autocast_of(kind)():
                    models[kind](b["pixel_values"])
        return run

    @torch.no_grad()
    def paper_eval_forward(with_metrics: bool):
        for b in val_padded:
            out = paper_like_forward(models["paper"], b, train=False)
            if with_metrics:
                metrics(out.logits, b["label"])

    with tempfile.TemporaryDirectory() as tmp:
        # The cache keys name image files (path, size, mtime): stand-ins for the validation images.
        paths = [[Path(tmp) / f"val_{i}_{j}.jpg" for j in range(args.batch)] for i in range(args.val_batches)]
        for group in paths:
            for p in group:
                p.write_bytes(p.name.encode())
        cache_holder = {}
        model = models[chosen]

        @torch.no_grad()
        def val_pass():  # as loops.evaluate: the cache outside autocast, the decoder inside
            cache = cache_holder["cache"]
            for b, group in zip(val_batches, paths, strict=True):
                features = cache.features(model, b["pixel_values"], group)
                with autocast_of(chosen)():
                    out = model.forward_features(features)
                metrics(out.logits, b["label"])

        def new_cache():  # an empty cache: the next pass is a first epoch
            cache_holder["cache"] = FeatureCache(model, size, folder=Path(tmp) / "cache")

        repeats = max(2, args.steps // 4)
        progress(f"evaluation and validation: {repeats} rounds over {n_val} images")
        new_cache()
        val_pass()  # warm-up of the cached path's allocations
        rounds = {f"eval_{kind}": eval_forward(kind) for kind in kinds}
        rounds.update(new_cache=new_cache, cold=val_pass, cached=val_pass, cached2=val_pass)
        if args.baseline:
            rounds.update(paper_eval=lambda: paper_eval_forward(False), paper_val=lambda: paper_eval_forward(True))
        evals = interleaved(rounds, repeats)
        evals["cached"] += evals.pop("cached2")
        ckpt = model.save_pretrained(Path(tmp) / "ckpt")
        ckpt_mb = sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6
        cache_dtype = str(cache_holder["cache"].dtype).removeprefix("torch.")

    progress("peak RSS: one child process per configuration")
    rss = {kind: rss_in_child(args, kind) for kind in kinds + (["paper"] if args.baseline else [])}

    med = statistics.median
    params = sum(p.numel() for p in models["fp32"].parameters()) / 1e6
    trained = sum(p.numel() for p in models["fp32"].parameters() if p.requires_grad) / 1e6
    step = {kind: med(train[kind]) for kind in steps}
    floor = {kind: med(train[f"floor_{kind}"]) for kind in kinds}
    ev = {kind: med(evals[f"eval_{kind}"]) / n_val for kind in kinds}
    paper_eval = med(evals["paper_eval"]) / n_val if args.baseline else None
    paper_val = med(evals["paper_val"]) / n_val if args.baseline else None
    paper = PAPER if not args.quick else {}

    def cells(values: dict, digits: int = 3) -> list[str]:
        return [_f(values.get(kind), digits) for kind in kinds]

    def target(text: str, ok: bool | None, measured: str) -> str:
        return "" if ok is None else f"{text}: {'met' if ok else 'MISSED'}, {measured}"

    def spread(times):
        return f"{min(times):.2f}..{max(times):.2f}" if times else ""

    best, like_step = step[kinds[-1]], step.get("paper")
    rows += [
        ("train step (s, median)", *cells(step), _f(like_step), _f(paper.get("train_step")),
         target(">= 3x paper-like", like_step / best >= 3, f"{like_step / best:.2f}x") if like_step else ""),
        ("  spread (min..max)", *[spread(train[kind]) for kind in kinds], spread(train.get("paper")), "", ""),
        ("frozen ViT forward alone (s)", *cells(floor), "", "", target("step <= 1.5x floor", best / floor[kinds[-1]] <= 1.5,
                                                                      f"{best / floor[kinds[-1]]:.2f}x")),
        ("samples/s (training)", *[_f(args.batch / step[kind], 2) for kind in kinds],
         _f(args.batch / like_step if like_step else None, 2), _f(args.batch / PAPER["train_step"] if paper else None, 2),
         ""),
        ("eval forward (s/image)", *cells(ev), _f(paper_eval), _f(paper.get("eval_forward")),
         target(">= 3x paper-like", paper_eval / ev[kinds[-1]] >= 3, f"{paper_eval / ev[kinds[-1]]:.2f}x")
         if paper_eval else ""),
        (f"validation, 1st epoch, {chosen} (s/image)", *[_f(med(evals["cold"]) / n_val) if k == chosen else ""
                                                       for k in kinds], _f(paper_val), _f(paper.get("val_pass")), ""),
        (f"validation, cached, {chosen} (s/image)", *[_f(med(evals["cached"]) / n_val, 4) if k == chosen else ""
                                                     for k in kinds], _f(paper_val), _f(paper.get("val_pass")), ""),
        ("peak RSS, training (GB)", *cells(rss, 2), _f(rss.get("paper"), 2), _f(paper.get("peak_rss_gb"), 2),
         target("<= 0.75x paper-like", rss[kinds[-1]] / rss["paper"] <= 0.75, f"{rss[kinds[-1]] / rss['paper']:.2f}x")
         if rss.get("paper") and rss[kinds[-1]] else ""),
        ("checkpoint (MB)", *[f"{ckpt_mb:.1f}" if k == chosen else "" for k in kinds], "",
         _f(paper.get("checkpoint_mb"), 0), ""),
        ("parameters (M), trained", *[f"{params:.1f}, {trained:.2f}" if k == chosen else "" for k in kinds], "",
         "238.8, 3.36" if paper else "", ""),
    ]
    if mixed:
        notes.append(f"bf16 eval forward vs fp32: {ev['fp32'] / ev['bf16']:.2f}x faster "
                     f"({'not slower: met' if ev['bf16'] <= ev['fp32'] else 'SLOWER'})")
    if compiled is not None:
        notes.append(f"torch.compile ({chosen}, encoder and decoder): first step {compiled:.1f} s (compilation), then "
                     f"{step['compiled']:.3f} s vs {step[chosen]:.3f} s eager ({step[chosen] / step['compiled']:.2f}x)")
    notes.append(f"validation: {n_val} images in batches of {args.batch}, tensors in memory (image decoding "
                 f"excluded); metrics without HD95 as during training; cache stores {cache_dtype}")
    notes.append("peak RSS: a child process per configuration builds the model as train.py does (float32, then "
                 "the CLIP cast for bf16) and trains; the paper-like one holds the paper's second vision encoder")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("pixel_values", "roi_pixel_values", "input_ids", "attention_mask")}


def _f(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def valid(answers) -> int:
    """How many answers parse as the five attributes."""
    from llava_inference.attributes import AnswerError, parse_answer

    ok = 0
    for answer in answers:
        with contextlib.suppress(AnswerError):
            parse_answer(answer, 3)
            ok += 1
    return ok


def bench_text(args) -> list[str]:
    """ROIs/s of the tiny LLaVA: batch 1 unconstrained (the paper's way) vs batched constrained."""
    try:
        from llava_inference.transformers_backend import TransformersDescriber
        from model.tiny import save_tiny_llava
    except ImportError as err:
        return [f"text generation: skipped ({err})"]
    from transformers.utils import logging

    logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(args.llava_batch)]
    keyword = "polyp area"

    progress(f"text generation: {args.llava_single} ROIs one by one (twice), {args.llava_batch} in one batch")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(Path(tmp) / "llava")
        free = TransformersDescriber(path, constrain=False, max_new_tokens=args.max_new_tokens)
        constrained = TransformersDescriber(path, constrain=True, max_new_tokens=args.max_new_tokens)
        free.generate(images[:1], [keyword])  # warm-up
        constrained.generate(images[:2], [keyword] * 2)
        n1 = args.llava_single
        start = time.perf_counter()
        single = [free.generate([images[i]], [keyword])[0] for i in range(n1)]
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        single_c = [constrained.generate([images[i]], [keyword])[0] for i in range(n1)]
        t1c = time.perf_counter() - start
        start = time.perf_counter()
        batched = constrained.generate(images, [keyword] * len(images))
        tb = time.perf_counter() - start
    r1, r1c, rb = n1 / t1, n1 / t1c, len(images) / tb
    lines = [f"{'text generation (tiny LLaVA, random weights)':<46}{'ROIs/s':>9}{'valid answers':>15}{'vs batch 1':>12}",
             f"{'batch 1, unconstrained (paper)':<46}{r1:>9.2f}{f'{valid(single)}/{n1}':>15}{'1.0x':>12}",
             f"{'batch 1, constrained':<46}{r1c:>9.2f}{f'{valid(single_c)}/{n1}':>15}{f'{r1c / r1:.1f}x':>12}",
             f"{f'batch {len(images)}, constrained (this code)':<46}{rb:>9.2f}"
             f"{f'{valid(batched)}/{len(images)}':>15}{f'{rb / r1:.1f}x':>12}",
             f"target: batched constrained >= 4x batch 1: {'met' if rb >= 4 * r1 else 'MISSED'}; "
             f"at most {args.max_new_tokens} new tokens, temperature 0.2"]
    return lines


QUANTIZE_MODES = ("none", "8bit", "4bit")


def measure_text_mode(args) -> None:
    """Child process of the bench: the tiny LLaVA at `args.llava_dir` loaded in `args.text_of`,
    a warm-up call, then timed batched constrained calls; peak RSS of the whole process."""
    from llava_inference.transformers_backend import TransformersDescriber

    mode = args.text_of
    describer = TransformersDescriber(args.llava_dir, quantize=mode, dtype="bfloat16" if mode == "none" else "auto",
                                      max_new_tokens=args.max_new_tokens)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(args.llava_batch)]
    keywords = ["polyp area"] * len(images)
    describer.generate(images[:2], keywords[:2])
    times = [_timed(describer.generate, images, keywords) for _ in range(args.text_rounds)]
    print(json.dumps(dict(rois_per_s=len(images) / statistics.median(times), peak_rss_gb=peak_rss_gb(),
                          weight_mb=describer.model.get_memory_footprint(return_buffers=False) / 2**20)))


def _timed(fn, *arguments) -> float:
    start = time.perf_counter()
    fn(*arguments)
    return time.perf_counter() - start


def bench_text_quantized(args) -> list[str]:
    """ROIs/s, peak RSS and weight size of the tiny LLaVA in bf16, 8bit and 4bit (a child process
    each, one after the other), and the weights of LLaVA-1.5-13B in each mode from its parameter counts."""
    from llava_inference.quantization import weight_bytes
    from model.tiny import real_size_llava_config, save_tiny_llava

    progress(f"text generation per --quantize mode: {args.text_rounds} batched calls of {args.llava_batch} ROIs each")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_llava(Path(tmp) / "llava", width=64)
        for mode in QUANTIZE_MODES:
            command = [sys.executable, str(Path(__file__).resolve()), "--text-of", mode, "--llava-dir", str(folder),
                       "--llava-batch", str(args.llava_batch), "--text-rounds", str(args.text_rounds),
                       "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                progress(f"--quantize {mode}: child failed ({(done.stderr.strip().splitlines() or ['no output'])[-1]})")
                continue
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    names = {"none": "bf16", "8bit": "8bit", "4bit": "4bit (nf4)"}
    lines = [f"{'tiny LLaVA (widths 64), batched constrained':<46}{'ROIs/s':>9}{'peak RSS (GB)':>15}{'weights (MB)':>14}"]
    for mode, result in results.items():
        lines.append(f"{names[mode]:<46}{result['rois_per_s']:>9.2f}{result['peak_rss_gb']:>15.2f}"
                     f"{result['weight_mb']:>14.3f}")
    from transformers import LlavaForConditionalGeneration

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


def bench_rois(count: int) -> list[np.ndarray]:
    """The ROIs both backends are timed on (the same in the vLLM child process)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + i % 5 * 8, 64, 3), dtype=np.uint8) for i in range(count)]


def vllm_worker(args) -> None:
    """In the vLLM venv: engine start, then ROIs/s of one generate() over every ROI; JSON on stdout."""
    from llava_inference.vllm_describer import VllmDescriber

    start = time.perf_counter()
    describer = VllmDescriber(args.vllm_worker, temperature=0, max_new_tokens=args.max_new_tokens)
    started = time.perf_counter() - start
    rois = bench_rois(args.vllm_rois)
    describer.generate(rois[:2], ["polyp area"] * 2)  # warm-up
    start = time.perf_counter()
    answers = describer.generate(rois, ["polyp area"] * len(rois))
    print(json.dumps({"start_s": started, "seconds": time.perf_counter() - start, "answers": answers}))


def bench_vllm(args) -> list[str]:
    """ROIs/s of get_text's two backends on the tiny LLaVA that both load, constrained and greedy:
    transformers in batches (get_text's --batch-size) and in one call, vLLM (a child process under
    the vLLM venv's Python) in one call, which it batches as it goes."""
    from llava_inference.transformers_backend import TransformersDescriber
    from model.tiny_vllm import save_tiny_vllm_llava

    python = Path(args.vllm_python)
    if not python.is_file():
        raise CoTexNetError(f"--vllm-python {python}: no such file; build the vLLM venv with `make vllm-venv`")
    rois, keyword = bench_rois(args.vllm_rois), "polyp area"

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_vllm_llava(Path(tmp) / "llava")
        progress(f"transformers: {len(rois)} ROIs in batches of {args.llava_batch}, then in one call")
        start = time.perf_counter()
        describer = TransformersDescriber(path, temperature=0, max_new_tokens=args.max_new_tokens)
        load_s = time.perf_counter() - start
        describer.generate(rois[:2], [keyword] * 2)  # warm-up
        start = time.perf_counter()
        batched = [answer for i in range(0, len(rois), args.llava_batch)
                   for answer in describer.generate(rois[i:i + args.llava_batch], [keyword] * len(rois[i:i + args.llava_batch]))]
        t_batched = time.perf_counter() - start
        start = time.perf_counter()
        one_call = describer.generate(rois, [keyword] * len(rois))
        t_one = time.perf_counter() - start
        del describer
        progress(f"vLLM ({python}): engine start, then {len(rois)} ROIs in one call")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_CPU_OMP_THREADS_BIND="nobind")
        done = subprocess.run([str(python), __file__, "--vllm-worker", str(path), "--vllm-rois", str(len(rois)),
                               "--max-new-tokens", str(args.max_new_tokens)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise CoTexNetError(f"the vLLM child process failed: {done.stderr.strip().splitlines()[-1:]}")
        engine = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"start_s"')))
    n = len(rois)
    same = sum(a == b for a, b in zip(engine["answers"], one_call, strict=True))
    valid_vllm = valid(engine["answers"])
    r_batched, r_one, r_vllm = n / t_batched, n / t_one, n / engine["seconds"]
    return [f"{'text generation, tiny LLaVA (random), greedy, constrained':<50}{'ROIs/s':>9}{'valid':>9}{'vs batched':>12}"
            f"{'start (s)':>11}",
            f"{f'transformers, batches of {args.llava_batch}':<50}{r_batched:>9.2f}{f'{valid(batched)}/{n}':>9}{'1.0x':>12}"
            f"{load_s:>11.1f}",
            f"{f'transformers, {n} in one call':<50}{r_one:>9.2f}{f'{valid(one_call)}/{n}':>9}{f'{r_one / r_batched:.1f}x':>12}"
            f"{load_s:>11.1f}",
            f"{f'vLLM {n} in one call (continuous batching)':<50}{r_vllm:>9.2f}{f'{valid_vllm}/{n}':>9}"
            f"{f'{r_vllm / r_batched:.1f}x':>12}{engine['start_s']:>11.1f}",
            f"answers equal to transformers' (one call): {same}/{n}; at most {args.max_new_tokens} new tokens; "
            "start: loading the model (vLLM: the engine, its processes and warm-up)"]


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--rss-of", choices=["fp32", "bf16", "paper"], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)  # the child process in the vLLM venv
    parser.add_argument("--text-of", choices=QUANTIZE_MODES, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--llava-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.steps, args.val_batches, args.llava_single, args.llava_batch,
           args.text_rounds, args.vllm_rois) < 1 \
            or args.warmup < 1:
        raise CoTexNetError("--batch, --threads, --steps, --warmup, --val-batches, --llava-*, --text-rounds, --vllm-rois: "
                            "must be >= 1")
    if args.quick:
        args.steps, args.warmup, args.val_batches = min(args.steps, 3), min(args.warmup, 1), min(args.val_batches, 2)
        args.llava_single, args.llava_batch, args.max_new_tokens = 2, 4, min(args.max_new_tokens, 64)
        args.text_rounds = 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.rss_of:
        measure_rss(args)
        return
    if args.text_of:
        measure_text_mode(args)
        return
    if args.vllm_worker:
        vllm_worker(args)
        return
    if args.vllm:
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} threads; at start {load()}", flush=True)
        for line in bench_vllm(args):
            print(line)
        print(f"\nat end: {load()}")
        return

    import transformers

    size = "tiny" if args.quick else "real size (CIDAS/clipseg-rd64-refined architecture, random weights)"
    chosen = "what train.py picks on this CPU" if args.dtype == default_dtype() else f"train.py picks {default_dtype()}"
    if args.segmentation:
        print(f"settings: {size}, batch {args.batch}, {args.threads} threads, precision {args.dtype} ({chosen}), "
              f"224 px, {args.steps} timed rounds after {args.warmup} warm-up")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}), transformers {transformers.__version__}; at start {load()}",
          flush=True)
    if args.segmentation:
        rows, notes = [], []
        bench_segmentation(args, rows, notes)
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
        for note in notes:
            print(note)
    if args.text:
        print()
        for line in bench_text(args) + [""] + bench_text_quantized(args):
            print(line)
    print(f"\nat end: {load()}")


if __name__ == "__main__":
    run_cli(main)
