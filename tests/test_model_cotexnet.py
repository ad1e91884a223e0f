"""CoTexNet's forward pass on the tiny CLIPSeg: shapes, gradients, both paths, and agreement
with the stock transformers CLIPSeg it is built from."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceCELoss

from common.errors import CoTexNetError
from model.CoTexNet import CoTexNet
from model.tiny import CLIP_BOS, CLIP_EOS, build_clipseg, tiny_clipseg_config
from train_utils.losses import CoTexNetLoss, distillation_kl

B = 2


@pytest.fixture(scope="module")
def clipseg():
    return build_clipseg(tiny_clipseg_config())


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(B, 3, 224, 224, generator=gen)
    mask = torch.zeros(B, 1, 224, 224)
    mask[:, :, 60:150, 40:120] = 1
    # "<bos> w1 .. w8 <eos> <pad> <pad>": the eos (position 9) comes after the ROI slot (5).
    input_ids = torch.randint(1000, 40000, (B, 12), generator=gen)
    input_ids[:, 0], input_ids[:, 9:] = CLIP_BOS, CLIP_EOS
    attention_mask = (torch.arange(12) < 10).long().expand(B, -1).clone()
    label = torch.zeros(B, 224, 224, dtype=torch.long)
    label[:, 60:150, 40:120] = 1
    label[:, 100:150, 40:80] = 2
    return dict(pixel_values=pixel_values, roi_pixel_values=pixel_values * mask, input_ids=input_ids,
                attention_mask=attention_mask, label=label)


def _inputs(batch):
    return {k: batch[k] for k in ("pixel_values", "roi_pixel_values", "input_ids", "attention_mask")}


@pytest.mark.parametrize("num_classes, channels", [(2, 1), (3, 3)])
def test_shapes_of_both_paths(clipseg, batch, num_classes, channels):
    model = CoTexNet.from_clipseg(clipseg, num_classes)
    train = model(**_inputs(batch))
    assert train.logits.shape == (B, channels, 224, 224)
    assert train.img_embedding.shape == train.text_embedding.shape == train.decoder_condition.shape == (B, 32)
    assert not train.text_embedding.requires_grad  # detached: the distillation teacher
    evaluation = model(batch["pixel_values"])
    assert evaluation.logits.shape == (B, channels, 224, 224) and evaluation.text_embedding is None
    # Logits, not probabilities.
    assert evaluation.logits.min() < 0 or evaluation.logits.max() > 1


def test_multiclass_head_is_xavier_with_zero_bias(clipseg):
    head = CoTexNet.from_clipseg(clipseg, 4).decoder.transposed_convolution[-1]
    assert head.out_channels == 4 and torch.count_nonzero(head.bias) == 0
    # Xavier-normal std for a (8, 4, 4, 4) ConvTranspose2d weight: fan_in = 4*16, fan_out = 8*16.
    assert abs(head.weight.std().item() - (2 / (64 + 128)) ** 0.5) < 0.03
    assert clipseg.decoder.transposed_convolution[-1].out_channels == 1  # the given CLIPSeg is untouched


def test_gradients_reach_only_trained_parts_and_the_mapper_through_the_text_encoder(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg, 3)
    out = model(**_inputs(batch))
    CoTexNetLoss(3)(out, batch["label"])["loss"].backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(not name.startswith("clip.") for name in trained)
    for name, p in model.named_parameters():
        if name.startswith("clip."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    # The mapper's only way to the loss is its token through the frozen text encoder.
    assert model.roi_mapper[0].weight.grad.abs().sum() > 0


def test_frozen_encoder_keeps_no_graph_and_switches_work(batch):
    model = CoTexNet.from_clipseg(build_clipseg(tiny_clipseg_config()))  # its own CLIP: unfrozen below
    activations, cls = model.encode_images(batch["pixel_values"])
    assert not cls.requires_grad and not any(a.requires_grad for a in activations)
    model.set_frozen(encoder=True, decoder=True)
    out = model(**_inputs(batch))
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    model.set_frozen(encoder=False, decoder=False)
    assert all(p.requires_grad for p in model.parameters())


def test_evaluation_path_never_runs_the_text_encoder(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)

    def refuse(*_):
        raise AssertionError("the text encoder ran on the evaluation path")

    text = model.clip.text_model
    hooks = [m.register_forward_pre_hook(refuse) for m in (text, text.embeddings, text.encoder, text.final_layer_norm)]
    try:
        with torch.no_grad():
            out = model(batch["pixel_values"])
            cached = model.forward_features(model.extract_features(batch["pixel_values"]))
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(out.logits, cached.logits)
    half = {k: v.half() for k, v in model.extract_features(batch["pixel_values"]).items()}  # a compact cache
    with torch.no_grad():
        from_half = model.forward_features(half).logits
    torch.testing.assert_close(from_half, out.logits, atol=0.05 * out.logits.abs().max().item(), rtol=0)
    assert torch.allclose(out.decoder_condition, out.img_embedding * model.var + model.mean)


def test_evaluation_path_equals_stock_clipseg_given_the_same_condition(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)
    with torch.no_grad():
        ours = model(batch["pixel_values"])
        stock = clipseg(pixel_values=batch["pixel_values"], conditional_embeddings=ours.decoder_condition)
    torch.testing.assert_close(ours.logits[:, 0], stock.logits, atol=1e-6, rtol=1e-6)


def test_text_path_without_roi_equals_stock_text_features(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        stock = clipseg.clip.get_text_features(ids, attention_mask=mask).pooler_output
        out = model(batch["pixel_values"], input_ids=ids, attention_mask=mask)
        # Trimmed padding gives the same features: callers may pass any length > roi_position.
        trimmed = model.text_features(ids[:, :10], mask[:, :10])
    torch.testing.assert_close(out.text_embedding, torch.sigmoid(stock), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trimmed, stock, atol=1e-6, rtol=1e-6)


def test_roi_token_replaces_token_and_position_embedding(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)
    roi = torch.randn(B, 32)
    ids = batch["input_ids"].clone()
    with torch.no_grad():
        first = model.text_features(ids, batch["attention_mask"], roi)
        ids[:, 5] = 320  # whatever token sat in the ROI slot, it is gone
        second = model.text_features(ids, batch["attention_mask"], roi)
        plain = model.text_features(ids, batch["attention_mask"])
    assert torch.equal(first, second) and not torch.allclose(first, plain)


def test_training_path_mixes_text_and_image_embeddings(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)
    with torch.no_grad():
        model.alpha.fill_(0.3)
        model.var.fill_(1.5)
        model.mean.fill_(-0.1)
        out = model(**_inputs(batch))
    expected = ((1 - 0.3) * out.text_embedding + 0.3 * out.img_embedding) * 1.5 - 0.1
    torch.testing.assert_close(out.decoder_condition, expected)
    assert ((out.img_embedding > 0.5) & (out.img_embedding < 0.7311)).all()  # sigmoid applied twice


def test_bad_inputs_are_refused(clipseg, batch):
    model = CoTexNet.from_clipseg(clipseg)
    with pytest.raises(CoTexNetError, match="position 5"):
        model(batch["pixel_values"], batch["roi_pixel_values"], batch["input_ids"][:, :5])
    with pytest.raises(CoTexNetError, match="without input_ids"):
        model(batch["pixel_values"], batch["roi_pixel_values"])
    with pytest.raises(CoTexNetError, match="num_classes"):
        CoTexNet.from_clipseg(clipseg, 1)
    with pytest.raises(CoTexNetError, match="no such CLIPSeg folder"):
        CoTexNet.from_clipseg("/nonexistent/clipseg-folder")


def test_from_pretrained_folder_matches_the_instance(clipseg, batch, tmp_path):
    clipseg.save_pretrained(tmp_path)
    from_folder = CoTexNet.from_clipseg(tmp_path, attn_implementation="eager")
    from_instance = CoTexNet.from_clipseg(clipseg)
    from_folder.load_state_dict(from_instance.state_dict())
    assert from_folder.clipseg_hf_api == str(tmp_path.resolve())
    assert from_folder.clip.config._attn_implementation == "eager"
    with torch.no_grad():
        eager, sdpa = from_folder(**_inputs(batch)).logits, from_instance(**_inputs(batch)).logits
    # Eager and SDPA attention round differently: compare relative to the logits' scale (~500).
    torch.testing.assert_close(eager, sdpa, atol=1e-6 * sdpa.abs().max().item(), rtol=0)


# --- losses -------------------------------------------------------------------------------
def test_kl_is_the_batch_mean_of_the_exact_formula():
    gen = torch.Generator().manual_seed(1)
    text, image = torch.rand(4, 32, generator=gen), torch.rand(4, 32, generator=gen)
    text.requires_grad_(True)
    q = torch.softmax(text, -1)
    expected = (q * (q.log() - torch.log_softmax(image, -1))).sum(-1).mean()
    kl = distillation_kl(text, image.requires_grad_(True))
    torch.testing.assert_close(kl, expected.detach())
    kl.backward()
    assert text.grad is None and image.grad is not None  # T is the teacher


@pytest.mark.parametrize("num_classes", [2, 3])
def test_loss_is_dice_ce_on_logits_plus_ten_kl(clipseg, batch, num_classes):
    model = CoTexNet.from_clipseg(clipseg, num_classes)
    out = model(**_inputs(batch))
    label = batch["label"] if num_classes == 3 else (batch["label"] > 0).long()
    losses = CoTexNetLoss(num_classes)(out, label)
    if num_classes == 2:
        seg = DiceCELoss(sigmoid=True)(out.logits, label[:, None].float())
    else:
        seg = DiceCELoss(softmax=True, to_onehot_y=True)(out.logits, label[:, None])
    kl = distillation_kl(out.text_embedding, out.img_embedding)
    torch.testing.assert_close(losses["seg"], seg)
    torch.testing.assert_close(losses["loss"], seg + 10 * kl)
    assert CoTexNetLoss(num_classes, kl_weight=0.0)(out, label)["loss"].item() == pytest.approx(seg.item())
    evaluation = CoTexNetLoss(num_classes)(model(batch["pixel_values"]), label)
    assert evaluation["kl"].item() == 0.0


def test_loss_rewards_the_right_mask():
    label = torch.zeros(1, 16, 16, dtype=torch.long)
    label[:, 4:12, 4:12] = 1
    logits = (label[:, None].float() * 2 - 1) * 8
    good, bad = (SimpleNamespace(logits=x, text_embedding=None, img_embedding=None) for x in (logits, -logits))
    loss = CoTexNetLoss(2)
    assert loss(good, label)["seg"] < 0.05 < loss(bad, label)["seg"]
