"""CoTexNet: CLIPSeg conditioned on a conceptual text prompt that carries an ROI pseudo-token.

Built from the stock `transformers` CLIPSeg modules (no forked library code):

- one frozen CLIP vision encoder for the query image and its ROI image (one batched call);
- the ROI's CLS token, mapped to the text width, replaces the input embedding (token and
  position) at `roi_position` of the prompt; the frozen text encoder then gives
  T = sigmoid(text projection at the first end-of-text token), and gradients reach the mapper
  through it;
- "Img2text" maps the image's CLS token to a pseudo text embedding I;
- the prompt embedding: training, (1 - a) T + a I; evaluation, I (no text, no ROI, no text
  encoder); then the FiLM condition, prompt * v + m ("inverse z-score"), feeds the decoder,
  which returns logits (1 map, or `num_classes`).
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
from transformers.masking_utils import create_causal_mask

from common.errors import CoTexNetError
from model import checkpoint

ROI_POSITION = 5  # the paper's: the prompt's token that the ROI pseudo-token replaces
# What a checkpoint's config.json holds of the model (`save_pretrained`), with the types it must have.
CHECKPOINT_KEYS = {"num_classes": (int,), "roi_position": (int,), "freeze_encoder": (bool,), "freeze_decoder": (bool,),
                   "includes_base": (bool,), "clipseg_hf_api": (str, type(None)), "base_fingerprint": (str, type(None)),
                   "clipseg_config": (dict,)}


@dataclass
class CoTexNetOutput:
    logits: torch.Tensor  # (B, C, H, W); C = 1 for binary, else num_classes
    img_embedding: torch.Tensor  # I (B, P)
    text_embedding: torch.Tensor | None  # T (B, P), detached; None on the evaluation path
    decoder_condition: torch.Tensor  # what FiLM receives (B, P)


def predict_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) logits -> (B,H,W) int64 labels: C=1 is binary (logit > 0), else argmax."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


class Img2Text(nn.Module):
    """CLS token -> pseudo text embedding: [Linear, ReLU] x 2 -> Linear -> sigmoid -> sigmoid.

    The paper applies the sigmoid twice (once in this module, once in the model); we keep it so
    that its checkpoints compute the same function. Module names follow the paper's.
    """

    def __init__(self, vision_dim: int, projection_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(vision_dim, vision_dim), nn.ReLU()) for _ in range(2))
        self.fc_out = nn.Linear(vision_dim, projection_dim)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            cls = layer(cls)
        return torch.sigmoid(torch.sigmoid(self.fc_out(cls)))


def _cls_row_of_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Output row 0 (CLS) of a pre-norm CLIP encoder layer: a query for that row only,
    keys and values from all rows (no mask: the vision encoder attends everywhere)."""
    attn = layer.self_attn
    batch, _, width = hidden.shape
    normed = layer.layer_norm1(hidden)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(heads(attn.q_proj(normed[:, :1])), heads(attn.k_proj(normed)),
                                             heads(attn.v_proj(normed)), scale=attn.scale)
    cls = hidden[:, 0] + attn.out_proj(context.transpose(1, 2).reshape(batch, width))
    return cls + layer.mlp(layer.layer_norm2(cls))


def clip_fingerprint(clip: nn.Module) -> str:
    """SHA-256 of a CLIP's weights (names, shapes, float32 values): the same whatever dtype or
    device they were loaded in with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().data)
    return digest.hexdigest()


def _load_clipseg(clipseg, attn_implementation: str | None) -> tuple[CLIPSegForImageSegmentation, str | None]:
    """A CLIPSeg instance and the name it was loaded from (None for an in-memory model)."""
    if isinstance(clipseg, CLIPSegForImageSegmentation):
        if attn_implementation is not None:
            clipseg.set_attn_implementation(attn_implementation)
        model, name = clipseg, clipseg.config.name_or_path or None
    else:
        name = str(clipseg)
        local = Path(name)
        if not local.is_dir() and (local.is_absolute() or name.startswith(".") or local.exists()):
            raise CoTexNetError(f"{name}: no such CLIPSeg folder")
        try:
            # float32 whatever the stored dtype: training runs under AMP, parity needs float32.
            model = CLIPSegForImageSegmentation.from_pretrained(
                name, dtype=torch.float32, attn_implementation=attn_implementation)
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise CoTexNetError(f"{name}: cannot load a CLIPSeg model from it ({str(err).splitlines()[0]})") from err
    # An absolute path for local folders, so that a checkpoint finds its base from anywhere.
    if name is not None and Path(name).is_dir():
        name = str(Path(name).resolve())
    return model, name


def _check_classes(folder: Path, config: dict, num_classes: int | None) -> None:
    if num_classes is not None and num_classes != config["num_classes"]:
        raise CoTexNetError(f"{folder}: checkpoint has num_classes {config['num_classes']}, expected {num_classes}")


class CoTexNet(nn.Module):
    def __init__(self, clipseg: CLIPSegForImageSegmentation, num_classes: int = 2, roi_position: int = ROI_POSITION,
                 clipseg_hf_api: str | None = None, freeze_encoder: bool = True, freeze_decoder: bool = False):
        super().__init__()
        if num_classes < 2:
            raise CoTexNetError(f"num_classes: {num_classes} (need 2 for binary, or the classes + background)")
        config = clipseg.config
        if not 1 <= roi_position < config.text_config.max_position_embeddings:
            raise CoTexNetError(f"roi_position: {roi_position} is outside the text sequence")
        self.num_classes, self.roi_position, self.clipseg_hf_api = num_classes, roi_position, clipseg_hf_api
        self.extract_layers = list(config.extract_layers)
        # The CLIP is shared with the given CLIPSeg (frozen and large: no copy); the
        # decoder is copied because it trains and may get a new head.
        self.clip = clipseg.clip
        self.decoder = copy.deepcopy(clipseg.decoder)
        if num_classes > 2:
            self._replace_head(num_classes)
        vision_dim, text_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        self.roi_mapper = nn.Sequential(nn.Linear(vision_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim),
                                        nn.LayerNorm(text_dim))
        self.img2text = Img2Text(vision_dim, config.projection_dim)
        # The paper's initial values: mixing weight a, "inverse z-score" v and m.
        self.alpha = nn.Parameter(torch.tensor([0.2]))
        self.var = nn.Parameter(torch.tensor([1.0]))
        self.mean = nn.Parameter(torch.tensor([-0.002]))
        self.set_frozen(freeze_encoder, freeze_decoder)
        # (state of the CLIP's tensors, fingerprint): see base_fingerprint.
        self._fingerprint: tuple[tuple, str] | None = None

    @classmethod
    def from_clipseg(cls, clipseg, num_classes: int = 2, roi_position: int = ROI_POSITION, *, freeze_encoder: bool = True,
                     freeze_decoder: bool = False, attn_implementation: str | None = "sdpa") -> CoTexNet:
        """From a CLIPSeg folder or hub id (`clipseg_hf_api`), or a `CLIPSegForImageSegmentation`,
        whose CLIP the model then shares (its attention implementation is set to ours)."""
        model, name = _load_clipseg(clipseg, attn_implementation)
        return cls(model, num_classes, roi_position, name, freeze_encoder, freeze_decoder)

    def _replace_head(self, num_classes: int) -> None:
        # The paper's multi-class head: the last transposed convolution outputs one map per
        # class, Xavier-normal weights and zero bias.
        conv = self.decoder.transposed_convolution
        last = conv[-1] if isinstance(conv, nn.Sequential) else conv
        head = nn.ConvTranspose2d(last.in_channels, num_classes, last.kernel_size, last.stride)
        nn.init.xavier_normal_(head.weight)
        nn.init.zeros_(head.bias)
        if isinstance(conv, nn.Sequential):
            conv[-1] = head
        else:
            self.decoder.transposed_convolution = head

    @classmethod
    def from_pretrained(cls, folder, clipseg=None, num_classes: int | None = None,
                        attn_implementation: str | None = "sdpa") -> CoTexNet:
        """The model of a checkpoint folder (`save_pretrained`; its `extra`: `model.checkpoint.read_extra`).

        `clipseg` (folder, hub id or CLIPSegForImageSegmentation) overrides the base the folder
        names; its weights must match the fingerprint. `num_classes`, when given, must match."""
        folder = Path(folder)
        config = checkpoint.read_config(folder, CHECKPOINT_KEYS)
        _check_classes(folder, config, num_classes)
        if config["includes_base"]:
            base = CLIPSegForImageSegmentation(CLIPSegConfig.from_dict(config["clipseg_config"])).eval()
        else:
            base = clipseg if clipseg is not None else config["clipseg_hf_api"]
            if base is None:
                raise CoTexNetError(f"{folder}: the checkpoint names no CLIPSeg base; pass the one it was trained on")
        model = cls.from_clipseg(base, config["num_classes"], config["roi_position"],
                                 freeze_encoder=config["freeze_encoder"], freeze_decoder=config["freeze_decoder"],
                                 attn_implementation=attn_implementation)
        model.clipseg_hf_api = config["clipseg_hf_api"]
        model.load_weights(folder)
        return model

    def load_weights(self, folder) -> dict:
        """Load a checkpoint folder's weights into this model, which must be built on the base the
        checkpoint was trained on (a resumed run's model); returns the checkpoint's `extra`. Only the
        trained weights are copied, unless the folder holds its base: a frozen CLIP is not touched
        (it may have been cast to bf16 already)."""
        folder = Path(folder)
        config = checkpoint.read_config(folder, CHECKPOINT_KEYS)
        _check_classes(folder, config, self.num_classes)
        state = checkpoint.read_weights(folder, config)
        if not config["includes_base"] and self.base_fingerprint() != config["base_fingerprint"]:
            raise CoTexNetError(f"{folder}: trained on a different CLIPSeg base than "
                                f"{self.clip.config.name_or_path or 'the given one'} (weight fingerprint differs); "
                                "pass the base it was trained on")
        checkpoint.load_state(self, state, folder / checkpoint.WEIGHTS, skip=None if config["includes_base"] else "clip.")
        return config["extra"]

    def save_pretrained(self, folder, extra: dict | None = None, with_base: bool | None = None) -> Path:
        """A checkpoint folder: the trained weights, and the CLIPSeg base by name and by the
        fingerprint of its weights. `with_base` (default: when the encoder trains) stores the base's
        weights too: a self-contained folder, which loads with no CLIPSeg given."""
        with_base = not self.freeze_encoder if with_base is None else with_base
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()
                 if with_base or not name.startswith("clip.")}
        config = dict(**self.config, includes_base=with_base, clipseg_config=self.clip.config.to_dict(),
                      base_fingerprint=None if with_base else self.base_fingerprint())
        return checkpoint.write(folder, state, config, extra)

    def _clip_state(self) -> tuple:
        # Storage and in-place version of every CLIP tensor: loading or training weights, or
        # casting them, changes it.
        return tuple((t.data_ptr(), t._version) for t in (*self.clip.parameters(), *self.clip.buffers()))

    def base_fingerprint(self) -> str:
        """`clip_fingerprint` of the CLIP, hashed again only when its weights have changed since."""
        state = self._clip_state()
        if self._fingerprint is None or self._fingerprint[0] != state:
            self._fingerprint = state, clip_fingerprint(self.clip)
        return self._fingerprint[1]

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.clip.text_projection.weight.dtype

    def cast_frozen_encoder(self, dtype: torch.dtype) -> None:
        """Keep the frozen CLIP's weights in `dtype` (bf16, fp16), cast once instead of by
        autocast at every call; the trained parts stay float32. Its activations then come out
        in `dtype`: run the rest under autocast. The fingerprint is of the weights as loaded."""
        if not self.freeze_encoder:
            raise CoTexNetError("cast_frozen_encoder: the encoder trains; it needs float32 weights")
        fingerprint = self.base_fingerprint()
        self.clip.to(dtype)
        self._fingerprint = self._clip_state(), fingerprint

    def compile_parts(self) -> None:
        """torch.compile of the frozen encoder's forward and of the decoder (TRAIN.compile)."""
        self.encode_images = torch.compile(self.encode_images)
        self.decoder.compile()

    def set_frozen(self, encoder: bool = True, decoder: bool = False) -> None:
        """Freeze the CLIP encoders (the paper's setting) and/or the decoder."""
        if not encoder and self.encoder_dtype != torch.float32:
            raise CoTexNetError("set_frozen: the encoder was cast to a lower precision; it cannot train")
        self.freeze_encoder, self.freeze_decoder = encoder, decoder
        self.clip.requires_grad_(not encoder)
        self.decoder.requires_grad_(not decoder)

    @property
    def config(self) -> dict:
        return dict(num_classes=self.num_classes, roi_position=self.roi_position, clipseg_hf_api=self.clipseg_hf_api,
                    freeze_encoder=self.freeze_encoder, freeze_decoder=self.freeze_decoder)

    # --- vision -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Extract-layer activations (for the decoder) and the CLS token of the last hidden
        state before the post layer norm (B, Hv). No graph is kept while the encoder is frozen.

        The stock vision model's layers, run one by one: layers after the last extract layer
        feed only the CLS token, so the final layer is computed for that one row (its keys and
        values still see every token): fewer FLOPs, the same result."""
        vision = self.clip.vision_model
        layers = vision.encoder.layers
        outputs = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            hidden = vision.pre_layrnorm(vision.embeddings(pixel_values.to(self.encoder_dtype)))
            for i, layer in enumerate(layers):
                if i == len(layers) - 1 and i not in self.extract_layers:
                    cls = _cls_row_of_layer(layer, hidden)
                    break
                hidden = outputs[i] = layer(hidden, None)
            else:
                cls = hidden[:, 0]
        return self._for_trained_parts([outputs[i] for i in self.extract_layers]), self._for_trained_parts(cls)

    def _for_trained_parts(self, x):
        """The frozen CLIP's output (a tensor or a list) as the trained float32 parts take it: as is
        under autocast, or in float32 without it (a CLIP cast to bf16 or fp16 returns those)."""
        if self.encoder_dtype == torch.float32 or torch.is_autocast_enabled(self.clip.text_projection.weight.device.type):
            return x
        return [t.float() for t in x] if isinstance(x, list) else x.float()

    def extract_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the evaluation path needs from the frozen encoder, batch first, for a cache."""
        activations, cls = self.encode_images(pixel_values)
        return {"activations": torch.stack(activations, dim=1), "vision_cls": cls}

    def encode_image_and_roi(self, pixel_values: torch.Tensor, roi_pixel_values: torch.Tensor | None):
        """`encode_images` of the images and their ROIs (when given) in one call: the ROIs' rows follow
        the images'. `model.paper_like` overrides it with the paper's two calls."""
        images = pixel_values if roi_pixel_values is None else torch.cat([pixel_values, roi_pixel_values])
        return self.encode_images(images)

    # --- text ---------------------------------------------------------------------------
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      roi_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Text projection (before sigmoid) at the first end-of-text token; `roi_embedding`
        (B, Ht), when given, replaces the whole input embedding at `roi_position`."""
        if input_ids.shape[1] <= self.roi_position:
            raise CoTexNetError(f"input_ids: length {input_ids.shape[1]} leaves no room for the ROI token "
                                f"at position {self.roi_position}")
        text = self.clip.text_model
        embeds = text.embeddings(input_ids=input_ids)
        if roi_embedding is not None:
            p = self.roi_position
            embeds = torch.cat([embeds[:, :p], roi_embedding[:, None].to(embeds.dtype), embeds[:, p + 1:]], dim=1)
        mask = create_causal_mask(config=text.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None)
        hidden = text.encoder(inputs_embeds=embeds, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        # The pooling rule of transformers' CLIPSegTextModel: configs from before its eos fix
        # (eos id 2) pool at the highest id, the others at the first eos.
        eos = input_ids.argmax(-1) if text.eos_token_id == 2 else (input_ids == text.eos_token_id).int().argmax(-1)
        return self._for_trained_parts(
            self.clip.text_projection(hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]))

    # --- forward ------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, roi_pixel_values: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CoTexNetOutput:
        """With a prompt: the training path (a-mix of T and I). Images only: the evaluation path."""
        if input_ids is None:
            if roi_pixel_values is not None:
                raise CoTexNetError("roi_pixel_values given without input_ids: the ROI token needs a prompt")
            return self.forward_features(self.extract_features(pixel_values))
        batch = pixel_values.shape[0]
        activations, cls = self.encode_image_and_roi(pixel_values, roi_pixel_values)
        roi_embedding = None if roi_pixel_values is None else self.roi_mapper(cls[batch:])
        text_embedding = torch.sigmoid(self.text_features(input_ids, attention_mask, roi_embedding))
        img_embedding = self.img2text(cls[:batch])
        prompt = (1 - self.alpha) * text_embedding + self.alpha * img_embedding
        return self._decode([a[:batch] for a in activations], prompt, img_embedding, text_embedding.detach())

    def forward_features(self, features: dict[str, torch.Tensor]) -> CoTexNetOutput:
        """The evaluation path from `extract_features` output: the prompt is I, no text encoder.
        A cache may hold the features in a lower precision: they are cast to the decoder's."""
        dtype = self.decoder.film_mul.weight.dtype
        img_embedding = self.img2text(features["vision_cls"].to(dtype))
        activations = list(features["activations"].to(dtype).unbind(dim=1))
        return self._decode(activations, img_embedding, img_embedding, None)

    def _decode(self, activations, prompt, img_embedding, text_embedding) -> CoTexNetOutput:
        film_condition = prompt * self.var + self.mean
        logits = self.decoder(activations, film_condition).logits
        if logits.dim() == 3:  # the stock decoder squeezes the single binary map
            logits = logits.unsqueeze(1)
        return CoTexNetOutput(logits, img_embedding, text_embedding, film_condition)
