"""Run by tests/test_text_vllm.py under the vLLM venv's Python: the vLLM backend's answers about
given ROIs, written as JSON.

    vllm_probe.py MODEL ROIS.npz OUT.json

ROIS.npz holds arrays roi0, roi1, ... (RGB). OUT.json gets, per ROI, the log-probabilities of the
first answer token (the 20 most likely, before any grammar: what the model computes from its
inputs), and ask()'s result with free answers (--no-constrain, 2 tries, 24 tokens).
"""

import json
import sys
from pathlib import Path

import numpy as np

from llava_inference.vllm_describer import VllmDescriber

KEYWORD = "polyp area"


def main() -> None:
    model, rois, out = sys.argv[1:]
    with np.load(rois) as data:
        images = [data[f"roi{i}"] for i in range(len(data.files))]
    describer = VllmDescriber(model, constrain=False, max_new_tokens=24, temperature=0.2)
    first = describer.sampling.clone()
    first.temperature, first.max_tokens, first.logprobs = 0.0, 1, 20
    outputs = describer.engine.generate(describer.requests(images, [KEYWORD] * len(images)), first, use_tqdm=False)
    logprobs = [{str(token): entry.logprob for token, entry in output.outputs[0].logprobs[0].items()}
                for output in outputs]
    described = describer.ask(images, [KEYWORD] * len(images), [1] * len(images), max_retries=2)
    Path(out).write_text(json.dumps({"logprobs": logprobs,
                                     "described": [[None if a is None else a.to_json(), tries] for a, tries in described]}))


if __name__ == "__main__":
    main()
