"""Lockstep: the project's training loop under `--protocol paper` against the paper's training
step, re-stated here from its main.py and train_utils/train_and_eval.py (METHOD.md, "The
paper's protocol, exactly"): MONAI `DiceCELoss()` on the sigmoid probabilities plus 10 x its
KLDiv, `AdamW(params that require grad, lr, weight_decay=1e-4)`, timm's `CosineLRScheduler`
with the paper's arguments and `step_update(epoch * len(loader) + i)` after the i-th step
(i from 1). Both sides start from the same weights and see the same batches; the model is the
project's (its parity with the paper's model is tests/test_model_parity.py).

Also here: resuming continues either schedule exactly, and N processes follow the one-GPU
schedule (`accelerate launch`)."""

from __future__ import annotations

import copy
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from monai.losses import DiceCELoss
from timm.scheduler.cosine_lr import CosineLRScheduler

from model.CoTexNet import CoTexNet
from model.tiny import CLIP_BOS, CLIP_EOS, save_clipseg_folder
from tests.train_fixtures import run_script, train_setup  # noqa: F401
from train_utils import run_state
from train_utils.config import load_config
from train_utils.loops import Training, train_one_epoch
from train_utils.losses import CoTexNetLoss
from train_utils.optim import build_optimizer, build_scheduler

EPOCHS, STEPS, BATCH, SIZE = 3, 3, 2, 64
LR, WARMUP_LR = 1e-3, 3e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # steps of a tiny model (conftest.py)


@pytest.fixture
def float32_accelerator():
    """A float32 Accelerator on a fresh accelerate state: the state is one per process, and an
    in-process train.py (bf16 where the CPU has it) must neither leave its precision to these
    tests nor find theirs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True, mixed_precision="no")
    AcceleratorState._reset_state(reset_partial_state=True)
# The KL (about 0.02 here) comes out of two float32 formulas that part by up to 3e-7; the total
# carries ten times that.
LOSS_TOLERANCE = dict(seg=1e-6, kl=1e-6, loss=1e-5)


@pytest.fixture(scope="module")
def clipseg_folder(tmp_path_factory):
    return save_clipseg_folder(tmp_path_factory.mktemp("lockstep") / "tiny_clipseg")


def fresh_model(clipseg_folder) -> CoTexNet:
    torch.manual_seed(7)  # the trained parts' initial weights
    return CoTexNet.from_clipseg(clipseg_folder)


def batches() -> list[dict]:
    """STEPS training batches as the loader gives them: images, ROI images, prompts, label maps."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        pixels = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
        label = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.long)
        for row in range(BATCH):
            top, left = torch.randint(0, SIZE // 2, (2,), generator=gen).tolist()
            label[row, top:top + SIZE // 3, left:left + SIZE // 4] = 1
        ids = torch.randint(1000, 40000, (BATCH, 12), generator=gen)
        ids[:, 0], ids[:, 9:] = CLIP_BOS, CLIP_EOS  # the eos after the ROI slot (position 5)
        out.append(dict(pixel_values=pixels, roi_pixel_values=pixels * (label[:, None] > 0), input_ids=ids,
                        attention_mask=(torch.arange(12) < 10).long().expand(BATCH, -1).clone(), label=label))
    return out


def paper_config(*overrides):
    return load_config(None, [f"TRAIN.epochs={EPOCHS}", f"TRAIN.lr={LR}", f"TRAIN.warmup_lr={WARMUP_LR}",
                              "TRAIN.amp=false", *overrides], protocol="paper")


# ---------------------------------------------------------------- the paper's step, re-stated

def paper_kl(student, teacher, temp=1.0):
    """train_and_eval.py's KLDiv: log-softmax of the student, softmax of the teacher, batch mean."""
    soft_student = F.log_softmax(student / temp, dim=1)
    soft_teacher = F.softmax(teacher / temp, dim=1)
    return F.kl_div(soft_student, soft_teacher, reduction="batchmean") * temp ** 2


def paper_training(model, loader, epochs, lr, warmup_lr, warmup_epoch) -> tuple[list[dict], list[dict]]:
    """main.py's train_main around train_and_eval.py's train_one_epoch, float32 (no scaler).
    Returns one record per step (the lr it stepped with, its losses) and one per epoch."""
    params_to_optimize = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_to_optimize, lr=lr, weight_decay=1e-4)
    lr_scheduler = CosineLRScheduler(optimizer, t_initial=int(epochs * len(loader)), warmup_lr_init=warmup_lr,
                                     warmup_t=int(warmup_epoch * len(loader)), cycle_limit=1, t_in_epochs=False)
    seg_loss, steps, per_epoch = DiceCELoss(), [], []
    for epoch in range(0, epochs):
        model.train()
        seg_values, text_values = [], []
        for i, sample in enumerate(loader, 1):
            out = model(sample["pixel_values"], sample["roi_pixel_values"], sample["input_ids"],
                        sample["attention_mask"])
            output = torch.sigmoid(out.logits)  # the paper's model returns probabilities
            cls_emb, text_emb = out.img_embedding, out.text_embedding
            target = sample["label"][:, None]  # its dataset's label: (B, 1, H, W) int64
            text_fit_loss = paper_kl(cls_emb, text_emb)
            seg_loss_value = seg_loss(output, target)
            out_loss = seg_loss_value + text_fit_loss * 10.0
            steps.append(dict(lr=optimizer.param_groups[0]["lr"], seg=seg_loss_value.item(),
                              kl=text_fit_loss.item(), loss=out_loss.item()))
            optimizer.zero_grad()
            out_loss.backward()
            optimizer.step()
            lr_scheduler.step_update(epoch * len(loader) + i)
            seg_values.append(seg_loss_value.item())
            text_values.append(text_fit_loss.item())
        per_epoch.append(dict(seg=sum(seg_values) / len(seg_values), kl=sum(text_values) / len(text_values),
                              lr=optimizer.param_groups[0]["lr"]))
    return steps, per_epoch


# ---------------------------------------------------------------- the project's loop

class Recorder(torch.nn.Module):
    """The project's criterion, noting at each step the lr its optimiser step will use."""

    def __init__(self, criterion, optimizer):
        super().__init__()
        self.criterion, self.optimizer, self.steps = criterion, optimizer, []

    def forward(self, output, label):
        losses = self.criterion(output, label)
        self.steps.append(dict(lr=self.optimizer.param_groups[0]["lr"], seg=losses["seg"].item(),
                               kl=losses["kl"].item(), loss=losses["loss"].item()))
        return losses


def project_parts(accelerator, model, cfg, loader):
    """As train.py builds them: optimiser, accelerate, then the schedule over the prepared loader."""
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    t = cfg.TRAIN
    criterion = Recorder(CoTexNetLoss(cfg.num_classes(), t.seg_weight, t.kl_weight, t.loss_input), optimizer)
    return model, optimizer, scheduler, criterion


def project_training(accelerator, model, cfg, loader, epochs=None):
    model, optimizer, scheduler, criterion = project_parts(accelerator, model, cfg, loader)
    per_epoch = [train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, epoch, print_freq=1)
                 for epoch in range(1, (epochs or cfg.TRAIN.epochs) + 1)]
    return criterion.steps, per_epoch


def trained(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_lockstep(accelerator, clipseg_folder, warmup_epoch: int, **mutation) -> None:
    """`mutation`: TRAIN keys set after the protocol (which would otherwise set them back)."""
    loader = batches()
    model = fresh_model(clipseg_folder)
    paper_model = copy.deepcopy(model)
    cfg = paper_config(f"TRAIN.warmup_epoch={warmup_epoch}")
    for key, value in mutation.items():
        setattr(cfg.TRAIN, key, value)
    ours, ours_epochs = project_training(accelerator, model, cfg, loader)
    paper, paper_epochs = paper_training(paper_model, loader, EPOCHS, LR, WARMUP_LR, warmup_epoch)
    assert len(ours) == len(paper) == EPOCHS * STEPS
    for step, (a, b) in enumerate(zip(ours, paper, strict=True), 1):
        assert a["lr"] == b["lr"], f"lr of step {step}: {a['lr']!r} here, {b['lr']!r} in the paper's code"
        for key, tolerance in LOSS_TOLERANCE.items():
            assert a[key] == pytest.approx(b[key], rel=0, abs=tolerance), f"{key} loss of step {step}"
    for epoch, (a, b) in enumerate(zip(ours_epochs, paper_epochs, strict=True), 1):
        assert a["lr"] == b["lr"], f"lr after epoch {epoch}"
        assert (a["train_seg"], a["train_kl"]) == pytest.approx((b["seg"], b["kl"]), rel=0, abs=1e-6), \
            f"epoch {epoch} losses"
    ours_weights, paper_weights = trained(model), trained(paper_model)
    assert ours_weights.keys() == paper_weights.keys()
    for name in ours_weights:
        torch.testing.assert_close(ours_weights[name], paper_weights[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"weights of {name} after the run: {m}")


@pytest.mark.parametrize("warmup_epoch", [0, 1])
def test_protocol_paper_trains_as_the_papers_step(float32_accelerator, clipseg_folder, warmup_epoch):
    assert_lockstep(float32_accelerator, clipseg_folder, warmup_epoch)


@pytest.mark.parametrize("mutation, warmup_epoch, caught", [
    (dict(lr_schedule="warmup_cosine"), 1, "lr of step 4:"),  # the cosine restarted after the warm-up
    (dict(loss_input="logits"), 0, "seg loss of step 1"),  # logits into the loss
])
def test_lockstep_catches_a_departure_from_the_paper(float32_accelerator, clipseg_folder, mutation, warmup_epoch,
                                                     caught):
    with pytest.raises(AssertionError, match=caught):
        assert_lockstep(float32_accelerator, clipseg_folder, warmup_epoch, **mutation)


def test_epoch_loss_weighs_images_where_the_paper_weighs_steps(float32_accelerator, clipseg_folder):
    """A short last batch: the same step losses, but the epoch's mean counts each image once
    here, each step once in the paper's log (README, "What differs")."""
    loader = batches()
    loader[-1] = {key: value[:1] for key, value in loader[-1].items()}
    model = fresh_model(clipseg_folder)
    paper_steps, paper_epochs = paper_training(copy.deepcopy(model), loader, 1, LR, WARMUP_LR, 0)
    ours_steps, ours_epochs = project_training(float32_accelerator, model, paper_config("TRAIN.epochs=1"), loader)
    assert [s["seg"] for s in ours_steps] == pytest.approx([s["seg"] for s in paper_steps], abs=1e-6)
    sizes = [len(batch["label"]) for batch in loader]
    by_image = sum(step["seg"] * n for step, n in zip(ours_steps, sizes, strict=True)) / sum(sizes)
    assert ours_epochs[0]["train_seg"] == pytest.approx(by_image, abs=1e-6)
    assert abs(ours_epochs[0]["train_seg"] - paper_epochs[0]["seg"]) > 1e-5  # ten times the agreement above


def test_paper_schedule_never_reaches_lr_after_a_warmup():
    """3 epochs of 4 steps, 1 of them warm-up: after epoch 1 ours is at lr (3e-4), the paper at
    2.25e-4 (the cosine of 12 steps read at step 4: lr (1 + cos(pi/3)) / 2)."""
    lrs = {}
    for schedule in ("warmup_cosine", "paper"):
        cfg = load_config(None, ["TRAIN.epochs=3", "TRAIN.warmup_epoch=1", "TRAIN.lr=3e-4", "TRAIN.warmup_lr=3e-5",
                                 f"TRAIN.lr_schedule={schedule}"])
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.lr)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=4)
        lrs[schedule] = [optimizer.param_groups[0]["lr"]]
        for t in range(1, 13):
            scheduler.step_update(t)
            lrs[schedule].append(optimizer.param_groups[0]["lr"])
    for schedule in lrs:  # the same warm-up: linear from warmup_lr
        assert lrs[schedule][:4] == pytest.approx([3e-5 + t * (3e-4 - 3e-5) / 4 for t in range(4)])
    assert lrs["warmup_cosine"][4] == pytest.approx(3e-4) and lrs["paper"][4] == pytest.approx(2.25e-4)
    assert max(lrs["paper"]) < 3e-4
    assert lrs["warmup_cosine"][-1] == lrs["paper"][-1] == 0


@pytest.mark.parametrize("lr_schedule", ["paper", "warmup_cosine"])
def test_resume_continues_the_schedule_exactly(float32_accelerator, clipseg_folder, tmp_path, lr_schedule):
    """Two epochs, save_last, a fresh process's objects restored by Training.resume, the third
    epoch: every step's lr, the losses and the weights are those of an uninterrupted run."""
    loader = batches()
    cfg = paper_config("TRAIN.warmup_epoch=1", f"TRAIN.lr_schedule={lr_schedule}")
    accelerator = float32_accelerator
    straight, _ = project_training(accelerator, fresh_model(clipseg_folder), cfg, loader)

    model, optimizer, scheduler, criterion = project_parts(accelerator, fresh_model(clipseg_folder), cfg, loader)
    for epoch in (1, 2):
        train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, epoch, print_freq=1)
    run = tmp_path / "run"
    done = Training(cfg, run, accelerator, model, criterion, optimizer, scheduler, loader, [], torch.Generator(), epoch=2)
    run_state.save_last(run, model, done.state_dict())

    torch.manual_seed(123)  # the resumed process's model starts elsewhere: last/ must bring it back
    model, optimizer, scheduler, criterion = project_parts(accelerator, CoTexNet.from_clipseg(clipseg_folder), cfg,
                                                           loader)
    training = Training(cfg, run, accelerator, model, criterion, optimizer, scheduler, loader, [], torch.Generator())
    training.resume()
    assert training.epoch == 2
    train_one_epoch(model, loader, criterion, optimizer, scheduler, accelerator, 3, print_freq=1)
    assert criterion.steps == straight[2 * STEPS:]  # lr and losses of epoch 3, exactly


@pytest.mark.slow
def test_n_processes_follow_the_one_gpu_schedule(train_setup, tmp_path):  # noqa: F811
    """`accelerate launch` with 2 processes, the global batch 4 split 2 + 2, on 6 training
    images (2 steps of 4 on one GPU; the last batch of a process is padded by accelerate): the
    lr after each epoch is timm's schedule read at the paper's step count, as a one-process run
    gets it."""
    overrides = ["--protocol", "paper", "TRAIN.epochs=3", "TRAIN.warmup_epoch=1", "TRAIN.train_data_ratio=0.75",
                 "TRAIN.amp=false", "TRAIN.num_overlays=0", f"TRAIN.run_dir={tmp_path}"]
    port = 29500 + (os.getpid() + 7) % 1000
    # --multi_gpu without a GPU: two processes over gloo (with --cpu, accelerate launches one).
    run_script("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
               "train.py", "--config", train_setup["config"], *overrides, "TRAIN.run_name=two", "TRAIN.cpu_threads=1")
    run_script("train.py", "--config", train_setup["config"], *overrides, "TRAIN.run_name=one")
    cfg = load_config(train_setup["config"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.lr)
    steps = 2  # ceil(6 images / batch 4): the paper's len(train_loader) on one GPU
    timm = CosineLRScheduler(optimizer, t_initial=3 * steps, warmup_lr_init=cfg.TRAIN.warmup_lr, warmup_t=steps,
                             cycle_limit=1, t_in_epochs=False)
    expected = []
    for epoch in range(3):
        timm.step_update(epoch * steps + steps)
        expected.append(optimizer.param_groups[0]["lr"])
    for name in ("two", "one"):
        logged = pd.read_csv(tmp_path / name / "log.csv")["lr"].tolist()
        assert logged == pytest.approx(expected, rel=1e-12, abs=0), name
