"""Segment new images with a trained run: no text, no ROI, no LLaVA (the evaluation path).

  python predict.py --run runs/kvasir_20260101-120000 --input photos/ --output masks_out/ [--overlay]

Writes <output>/<image stem>.png at each image's original size (binary: 0/255; multi-class:
the class ids 0..K), and with --overlay <output>/overlays/<stem>.png (image | prediction).
Mask names are the image stems, as in the dataset layout: input images that share a stem
(a.jpg and a.png) are refused up front, listed, rather than one mask silently replacing the other.
Unreadable images are listed (and written to <output>/unreadable.txt); the rest are processed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from common.errors import CoTexNetError, run_cli
from data_process.registry import read_image
from data_process.transforms import eval_transform
from train_utils import data, engine, reporting
from train_utils.metrics import predict_labels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageFiles(Dataset):
    """Images only, resized and normalised exactly as in validation."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, eval_transform(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image = read_image(self.paths[index])
        pixels = self.transform(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))
        return dict(pixel_values=pixels.as_subclass(torch.Tensor), name=str(self.paths[index]),
                    orig_size=image.shape[:2])


def collate(batch: list[dict]) -> dict:
    good = [item for item in batch if "error" not in item]
    return dict(pixel_values=torch.stack([item["pixel_values"] for item in good]) if good else None,
                name=[item["name"] for item in good], orig_size=[item["orig_size"] for item in good],
                errors=[item["error"] for item in batch if "error" in item])


def input_files(source: Path, output: Path) -> list[Path]:
    if not source.exists():
        raise CoTexNetError(f"--input {source}: no such file or folder")
    folder = source if source.is_dir() else source.parent
    if output.resolve() == folder.resolve() or folder.resolve() in output.resolve().parents:
        raise CoTexNetError(f"--output {output}: inside the input folder {folder}; choose another folder "
                            "(masks would mix with, or overwrite, the inputs)")
    if source.is_file():
        return [source]
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CoTexNetError(f"--input {source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path.name)
    shared = [" and ".join(names) for names in by_stem.values() if len(names) > 1]
    if shared:
        raise CoTexNetError(f"--input {source}: images that would write the same mask <stem>.png: "
                            f"{'; '.join(shared)}; rename or move one of each")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--input", required=True, help="an image, or a folder of images")
    parser.add_argument("--output", required=True, help="folder for the masks (not the input folder)")
    parser.add_argument("--overlay", action="store_true", help="also write image | prediction pictures")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default: best)")
    parser.add_argument("--clipseg", help="CLIPSeg base folder or hub id, if not the one the run recorded")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the run's TRAIN.batch_size)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size: must be at least 1, got {args.batch_size}")

    output = Path(args.output)
    files = input_files(Path(args.input), output)
    cfg, model, _ = engine.load_run(args.run, args.checkpoint, args.clipseg)
    if args.batch_size is not None:
        cfg.TRAIN.batch_size = args.batch_size
    accelerator = engine.make_accelerator(cfg)
    engine.apply_precision(model, accelerator, cfg.TRAIN.compile)
    model = model.to(accelerator.device)
    loader = data.loader(cfg, data.SkipUnreadable(ImageFiles(files, cfg.TRAIN.input_size)), collate_fn=collate)

    written, unreadable = 0, []
    for batch in tqdm(loader, desc="predict", unit="batch"):
        unreadable += batch["errors"]
        if not batch["name"]:
            continue
        with torch.no_grad(), accelerator.autocast():
            logits = model(batch["pixel_values"].to(accelerator.device)).logits.float()
        for i, (name, (h, w)) in enumerate(zip(batch["name"], batch["orig_size"], strict=True)):
            pred = predict_labels(F.interpolate(logits[i : i + 1], size=(h, w), mode="bilinear",
                                                align_corners=False))[0].cpu().numpy()
            stem = Path(name).stem
            reporting.write_mask(output / f"{stem}.png", pred, cfg.DATASET.num_classes)
            if args.overlay:
                reporting.write_overlay(output / "overlays" / f"{stem}.png", read_image(name), None, pred)
            written += 1
    data.report_unreadable(unreadable, output / "unreadable.txt")
    print(f"{written} mask(s) written to {output}" + (f", overlays in {output / 'overlays'}" if args.overlay else ""))
    if not written:
        raise CoTexNetError(f"--input {args.input}: none of the images could be read")


if __name__ == "__main__":
    run_cli(main)
