"""model.paper_like.PaperLikeCoTexNet, the baseline tools/bench.py times beside CoTexNet: our
function, computed with the paper's work (the ROI through a second vision encoder in a call of its
own, every vision layer in full, prompts padded to 77 tokens, the text encoder at evaluation too)."""

import pytest
import torch

from model.CoTexNet import CoTexNet
from model.paper_like import PaperLikeCoTexNet
from model.tiny import build_clipseg, tiny_clipseg_config

PROMPTS = ["1 round small pink polyp area, located in the center of the image.", "2 irregular large red polyp areas."]


@pytest.fixture
def models():
    config = tiny_clipseg_config()
    return (CoTexNet.from_clipseg(build_clipseg(config, seed=0)),
            PaperLikeCoTexNet.from_clipseg(build_clipseg(config, seed=0)))


@pytest.fixture
def batch(tokenizer):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=gen)
    prompts = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # padded to the longest, as training pads
    return dict(pixel_values=pixels, roi_pixel_values=pixels * (torch.rand(2, 1, 224, 224, generator=gen) > 0.5),
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"])


def record_calls(module: torch.nn.Module) -> list:
    """The first tensor argument (or `input_ids`) of each call of `module`."""
    calls = []
    module.register_forward_pre_hook(lambda _, args, kwargs: calls.append(args[0] if args else kwargs["input_ids"]),
                                     with_kwargs=True)
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_training_forward_is_ours_computed_the_papers_way(models, batch, tokenizer):
    ours, paper = models
    image_calls, roi_calls = record_calls(paper.clip.vision_model), record_calls(paper.roi_vision)
    full_last_layer, text_ids = record_calls(paper.clip.vision_model.encoder.layers[-1]), []
    paper.clip.text_model.embeddings.register_forward_pre_hook(
        lambda _, args, kwargs: text_ids.append(kwargs["input_ids"]), with_kwargs=True)
    with torch.no_grad():
        expected = ours(**batch).logits
        got = paper(**batch).logits
    assert rel(got, expected) < 1e-5
    # Two vision calls of one batch each, the ROI's on the second encoder, every layer for every token.
    assert [c.shape[0] for c in image_calls] == [2] and torch.equal(image_calls[0], batch["pixel_values"])
    assert [c.shape[0] for c in roi_calls] == [2] and torch.equal(roi_calls[0], batch["roi_pixel_values"])
    assert [c.shape[1] for c in full_last_layer] == [197]
    # The paper's tokenizer call, padding="max_length" to 77 (restated here), is what the text encoder gets.
    assert torch.equal(text_ids[0], tokenizer(PROMPTS, padding="max_length", max_length=77,
                                              return_tensors="pt")["input_ids"])


def test_the_second_encoder_is_a_frozen_copy_that_the_roi_goes_through(models, batch):
    _, paper = models
    assert all(not p.requires_grad for p in paper.roi_vision.parameters())
    assert not {p.data_ptr() for p in paper.roi_vision.parameters()} & {p.data_ptr() for p in paper.clip.parameters()}
    with torch.no_grad():
        before = paper(**batch).logits
        paper.roi_vision.post_layernorm.weight.add_(1.0)  # unused by CoTexNet: no change
        assert torch.equal(paper(**batch).logits, before)
        paper.roi_vision.pre_layrnorm.weight.mul_(0.5)
        assert not torch.allclose(paper(**batch).logits, before)


def test_evaluation_runs_the_text_encoder_and_returns_ours(models, batch):
    ours, paper = (m.eval() for m in models)
    ours_text, paper_text = record_calls(ours.clip.text_model.embeddings), record_calls(paper.clip.text_model.embeddings)
    with torch.no_grad():
        expected = ours(batch["pixel_values"]).logits
        got = paper(batch["pixel_values"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert rel(got.logits, expected) < 1e-5 and got.text_embedding is None
    assert ours_text == [] and [ids.shape[1] for ids in paper_text] == [77]
