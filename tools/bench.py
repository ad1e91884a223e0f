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
vs one batched grammar-constrained call.

Run: `make bench`, or `python tools/bench.py [--quick] [--batch 4] [--threads 2] [--dtype fp32]`.
Timings are medians; on a shared machine they vary with its load (printed with the table).
"""

import sys, pathlib; sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # noqa: E401,E702,I001

import argparse
import contextlib
import os
import platform
import resource
import statistics
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
    out = collate(items)
    if pad_to:  # the paper's padding: attention on the prompt only, sequence of 77
        out["attention_mask"] = (out["input_ids"] != tokenizer.pad_token_id).long()
        out["attention_mask"][:, 0] = 1
        eos = (out["input_ids"] == tokenizer.eos_token_id).int().argmax(dim=1)
        out["attention_mask"][torch.arange(batch), eos] = 1
    return out


def paper_like_forward(model, batch: dict, train: bool):
    """The paper's computation on our model: two full vision calls, 77-token text, and on the
    evaluation path the text encoder too (its result unused, as in the paper's code)."""
    from model.CoTexNet import CoTexNetOutput

    vision = model.clip.vision_model
    with torch.no_grad():
        image = vision(batch["pixel_values"], output_hidden_states=True)
        roi = vision(batch["roi_pixel_values"], output_hidden_states=True) if train else None
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


def bench_segmentation(args, rows: list, notes: list) -> None:
    from model.checkpoint import save_checkpoint
    from model.CoTexNet import CoTexNet
    from model.feature_cache import FeatureCache
    from model.tiny import build_clipseg, clip_tokenizer, real_size_clipseg_config, tiny_clipseg_config
    from train_utils.losses import CoTexNetLoss
    from train_utils.metrics import image_metrics, predict_labels

    config = tiny_clipseg_config() if args.quick else real_size_clipseg_config()
    model = CoTexNet.from_clipseg(build_clipseg(config, seed=0))
    tokenizer = clip_tokenizer()
    size = config.vision_config.image_size
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    criterion = CoTexNetLoss(2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-4)
    batch = synthetic_batch(tokenizer, args.batch, size, seed=1)
    padded = synthetic_batch(tokenizer, args.batch, size, seed=1, pad_to=77)
    notes.append(f"prompt tokens per batch: {batch['input_ids'].shape[1]} (trimmed to the longest), "
                 f"paper-like: {padded['input_ids'].shape[1]}")

    # Same function both ways (a check that the timed paths compute the same thing).
    with torch.no_grad():
        ours, ref = model(**_model_inputs(batch)), paper_like_forward(model, padded, train=True)
    diff = ((ours.logits - ref.logits).abs().max() / ref.logits.abs().max()).item()
    notes.append(f"check: this code's training forward equals the paper-like one (max logit difference "
                 f"{diff:.1e} of the largest logit)")

    def step(forward):
        def run():
            with autocast():
                losses = criterion(forward(), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
        return run

    ours, like = step(lambda: model(**_model_inputs(batch))), step(lambda: paper_like_forward(model, padded, True))
    progress(f"training: {args.warmup} warm-up + {args.steps} timed steps" + (", alternating with the paper-like "
                                                                             "step" if args.baseline else ""))
    model.train()
    for _ in range(args.warmup):
        ours()
    rss = peak_rss_gb()  # this code's training peak (reached in the first steps), before the paper-like path runs
    for _ in range(args.warmup if args.baseline else 0):
        like()
    train = interleaved(dict(ours=ours, like=like) if args.baseline else dict(ours=ours), args.steps)

    # Evaluation: forward only; validation: forward + prediction + per-image metrics.
    model.eval()
    n_val = args.val_batches * args.batch
    val_batches = [synthetic_batch(tokenizer, args.batch, size, seed=100 + i) for i in range(args.val_batches)]
    val_padded = [synthetic_batch(tokenizer, args.batch, size, seed=100 + i, pad_to=77) for i in range(args.val_batches)]

    def metrics(logits, labels):
        image_metrics(predict_labels(logits.float()), labels, 2, hd95=False)

    @torch.no_grad()
    def eval_forward():
        for b in val_batches:
            with autocast():
                model(b["pixel_values"])

    @torch.no_grad()
    def paper_eval_forward(with_metrics: bool):
        for b in val_padded:
            with autocast():
                out = paper_like_forward(model, b, train=False)
            if with_metrics:
                metrics(out.logits, b["label"])

    with tempfile.TemporaryDirectory() as tmp:
        # The cache keys name image files (path, size, mtime): stand-ins for the validation images.
        paths = [[Path(tmp) / f"val_{i}_{j}.jpg" for j in range(args.batch)] for i in range(args.val_batches)]
        for group in paths:
            for p in group:
                p.write_bytes(p.name.encode())
        cache_holder = {}

        @torch.no_grad()
        def val_pass():
            cache = cache_holder["cache"]
            for b, group in zip(val_batches, paths, strict=True):
                with autocast():
                    out = model.forward_features(cache.features(model, b["pixel_values"], group))
                metrics(out.logits, b["label"])

        def new_cache():  # an empty cache: the next pass is a first epoch
            cache_holder["cache"] = FeatureCache(model, size, folder=Path(tmp) / "cache")

        repeats = max(2, args.steps // 4)
        progress(f"evaluation and validation: {repeats} rounds over {n_val} images")
        new_cache()
        val_pass()  # warm-up of the cached path's allocations
        rounds = dict(eval=eval_forward, new_cache=new_cache, cold=val_pass, cached=val_pass, cached2=val_pass)
        if args.baseline:
            rounds.update(paper_eval=lambda: paper_eval_forward(False), paper_val=lambda: paper_eval_forward(True))
        evals = interleaved(rounds, repeats)
        evals["cached"] += evals.pop("cached2")
        ckpt = save_checkpoint(model, Path(tmp) / "ckpt")
        ckpt_mb = sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6

    med = statistics.median
    params = sum(p.numel() for p in model.parameters()) / 1e6
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    train_times, paper_train = train["ours"], train.get("like")
    step_s = med(train_times)
    here = dict(train_step=step_s, eval_forward=med(evals["eval"]) / n_val, val_cold=med(evals["cold"]) / n_val,
                val_cached=med(evals["cached"]) / n_val)
    like = (dict(train_step=med(paper_train), eval_forward=med(evals["paper_eval"]) / n_val,
                 val_pass=med(evals["paper_val"]) / n_val) if args.baseline else {})
    paper = PAPER if not args.quick else {}

    def ratio(a, b):
        return f"{b / a:.1f}x" if a and b else ""

    rows += [
        ("train step (s, median)", f"{step_s:.3f}", _f(like.get("train_step")), _f(paper.get("train_step")),
         ratio(step_s, like.get("train_step")), "<= 0.90 s (2x)"),
        ("  spread (min..max)", f"{min(train_times):.2f}..{max(train_times):.2f}",
         f"{min(paper_train):.2f}..{max(paper_train):.2f}" if paper_train else "", "", "", ""),
        ("samples/s (training)", f"{args.batch / step_s:.2f}", _f(args.batch / like["train_step"] if like else None, 2),
         _f(args.batch / PAPER["train_step"] if paper else None, 2), "", ""),
        ("eval forward (s/image)", f"{here['eval_forward']:.3f}", _f(like.get("eval_forward")),
         _f(paper.get("eval_forward")), ratio(here["eval_forward"], like.get("eval_forward")), ""),
        ("validation, 1st epoch (s/image)", f"{here['val_cold']:.3f}", _f(like.get("val_pass")),
         _f(paper.get("val_pass")), ratio(here["val_cold"], like.get("val_pass")), ""),
        ("validation, cached (s/image)", f"{here['val_cached']:.4f}", _f(like.get("val_pass")),
         _f(paper.get("val_pass")), ratio(here["val_cached"], like.get("val_pass")), "<= 0.027 (10x)"),
        ("peak RSS, training (GB)", f"{rss:.2f}", "", _f(paper.get("peak_rss_gb"), 2), "", "<= 1.9"),
        ("checkpoint (MB)", f"{ckpt_mb:.1f}", "", _f(paper.get("checkpoint_mb"), 0), "", "<= 50"),
        ("parameters (M), trained", f"{params:.1f}, {trained:.2f}", "", "238.8, 3.36" if paper else "", "", ""),
    ]
    notes.append(f"validation: {n_val} images in batches of {args.batch}, tensors in memory (image decoding "
                 "excluded); metrics without HD95 as during training; cache stores float16")


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("pixel_values", "roi_pixel_values", "input_ids", "attention_mask")}


def _f(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def bench_text(args) -> list[str]:
    """ROIs/s of the tiny LLaVA: batch 1 unconstrained (the paper's way) vs batched constrained."""
    try:
        from llava_inference.attributes import AnswerError, parse_answer
        from llava_inference.llava_model import LlavaDescriber
        from model.tiny import save_tiny_llava
    except ImportError as err:
        return [f"text generation: skipped ({err})"]
    from transformers.utils import logging

    logging.disable_progress_bar()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(args.llava_batch)]
    keyword = "polyp area"

    def valid(answers):
        ok = 0
        for answer in answers:
            with contextlib.suppress(AnswerError):
                parse_answer(answer, 3)
                ok += 1
        return ok

    progress(f"text generation: {args.llava_single} ROIs one by one (twice), {args.llava_batch} in one batch")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_llava(Path(tmp) / "llava")
        free = LlavaDescriber(path, constrain=False, max_new_tokens=args.max_new_tokens)
        constrained = LlavaDescriber(path, constrain=True, max_new_tokens=args.max_new_tokens)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="training and evaluation batch size (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast (fast only on CPUs with native bf16: AVX-512 BF16, AMX)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10; median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches per pass (default 4)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the paper-like path (halves the run time)")
    parser.add_argument("--no-text", dest="text", action="store_false", help="skip the text-generation table")
    parser.add_argument("--llava-single", type=int, default=4, help="ROIs generated one by one (default 4)")
    parser.add_argument("--llava-batch", type=int, default=16, help="ROIs in the batched call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="generation limit (default 512, the paper's)")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke test of this script")
    args = parser.parse_args(argv)
    if min(args.batch, args.threads, args.steps, args.val_batches, args.llava_single, args.llava_batch) < 1 \
            or args.warmup < 1:
        raise CoTexNetError("--batch, --threads, --steps, --warmup, --val-batches, --llava-*: must be >= 1")
    if args.quick:
        args.steps, args.warmup, args.val_batches = min(args.steps, 3), min(args.warmup, 1), min(args.val_batches, 2)
        args.llava_single, args.llava_batch, args.max_new_tokens = 2, 4, min(args.max_new_tokens, 64)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers

    size = "tiny" if args.quick else "real size (CIDAS/clipseg-rd64-refined architecture, random weights)"
    print(f"settings: {size}, batch {args.batch}, {args.threads} threads, {args.dtype}, 224 px, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}), transformers {transformers.__version__}; at start {load()}",
          flush=True)
    rows, notes = [], []
    bench_segmentation(args, rows, notes)
    header = ("", "this code", "paper-like here", "paper code", "speed-up", "target")
    widths = [32, 14, 16, 11, 9, 15]
    print()
    for row in [header, tuple("-" * (w - 1) for w in widths), *rows]:
        print("".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(row, widths, strict=True))))
    print("paper-like here: the paper's computation timed on this model in this run (see --help); "
          "paper code: its figures on a quiet machine of this kind; speed-up: paper-like here / this code")
    for note in notes:
        print(note)
    if args.text:
        print()
        for line in bench_text(args):
            print(line)
    print(f"\nat end: {load()}")


if __name__ == "__main__":
    run_cli(main)
