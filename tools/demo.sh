#!/usr/bin/env bash
# `make demo`: the whole CoTexNet pipeline, offline, on 2 CPU cores, in a few minutes.
# Synthetic polyp-like data -> train/val/test splits -> offline augmentation of the train split
# (horizontal flips) -> ROI images and geometry text for originals and copies alike -> a tiny
# random CLIPSeg built from a config -> train -> reload the best checkpoint -> test table ->
# evaluation at the original image sizes, with the concept readout -> evaluation on a second
# dataset of another layout -> one results table. Every step is the command a researcher runs
# on real data; only the inputs are small. Everything goes to demo_out/, which each demo starts afresh.
set -euo pipefail
PY=${1:-python}
OUT=demo_out
DATA=$OUT/data
rm -rf "$OUT"

echo "== 1/11 synthetic dataset"
$PY data_process/make_synthetic.py --root "$DATA" --name synthetic --count 160 --seed 0
echo "== 2/11 train/val/test splits"
$PY data_process/make_splits.py --dataset-name synthetic --dataset-path "$DATA/synthetic" --out-dir "$OUT/splits"
echo "== 3/11 offline augmentation of the train split (one op here; the paper's default: hflip,vflip,scale0.75,scale1.25)"
$PY data_process/augment_data.py --dataset-name synthetic --dataset-path "$DATA/synthetic" --split-dir "$OUT/splits" \
    --ops hflip
echo "== 4/11 ROI images (stage 1)"
$PY data_process/make_ROI_img.py --dataset-name synthetic --dataset-path "$DATA/synthetic" --img-format .jpg
echo "== 5/11 conceptual text from the masks (stage 2, geometry describer: no LLaVA needed)"
$PY get_text.py --dataset-name synthetic --dataset-path "$DATA/synthetic" --describer geometry \
    --out "$OUT/text_file/synthetic/synthetic_text_out.csv"
echo "== 6/11 a tiny random CLIPSeg, built offline from a config"
$PY -m model.tiny --out "$OUT/tiny-clipseg"
echo "== 7/11 train CoTexNet (stage 3), reload the best checkpoint, test"
$PY train.py --config dataset_config/demo_config.yaml
echo "== 8/11 the best checkpoint on the test split, at each image's original size, and the concept it sees"
$PY evaluate.py --run "$OUT/runs/demo" --split test --readout
echo "== 9/11 a second dataset of another layout (PNG masks, not in the registry: keyword \"target area\")"
$PY data_process/make_synthetic.py --root "$DATA" --name synthetic_png --count 40 --seed 1 --mask-format png
$PY data_process/make_splits.py --dataset-name synthetic_png --dataset-path "$DATA/synthetic_png" --out-dir "$OUT/splits"
echo "== 10/11 cross-dataset: the demo run on all of synthetic_png"
$PY evaluate.py --run "$OUT/runs/demo" --dataset synthetic_png --split all
echo "== 11/11 one table of every run x dataset/split"
$PY tools/results_table.py "$OUT"/runs/* --out "$OUT/results.md"
echo
echo "demo done: curves at $OUT/runs/demo/curves.png, overlays in $OUT/runs/demo/overlays/ and $OUT/runs/demo/eval_test/overlays/,"
echo "concepts in $OUT/runs/demo/eval_test/concept.csv, the table in $OUT/results.md"
