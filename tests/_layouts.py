"""Checkpoint folders written by the training libraries' own saving code, on tiny models.

Each builder trains a few steps and returns the folder; the libraries are optional (extra `layouts`),
so each builder imports its library itself and tests call pytest.importorskip first. The torchvision
reference dict is built by hand exactly as torchvision's references/classification/train.py saves it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _batches(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def build_torchvision(root: Path, epochs: int = 4) -> Path:
    """references/classification/train.py: model_<epoch>.pth and checkpoint.pth each hold
    {model, optimizer, lr_scheduler, epoch, args: argparse.Namespace} (utils.save_on_master)."""
    out = root / "tv_run"
    out.mkdir(parents=True)
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    args = argparse.Namespace(data_path="/data", model="tiny", epochs=epochs, lr=0.1, output_dir=str(out),
                              device="cpu", batch_size=8, resume="", start_epoch=0)
    for epoch in range(epochs):
        for x, y in _batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
        checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "lr_scheduler": sched.state_dict(), "epoch": epoch, "args": args}
        torch.save(checkpoint, os.path.join(args.output_dir, f"model_{epoch}.pth"))
        torch.save(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))
    return out


def build_lightning(root: Path, epochs: int = 4) -> Path:
    """ModelCheckpoint(save_top_k=-1, save_last=True) with save_hyperparameters()."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self, hidden: int = 5, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = _tiny_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    out = root / "pl_run"
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=-1, save_last=True, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[ckpt], default_root_dir=out, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1)
    xs, ys = zip(*_batches())
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=8))
    return out


def build_accelerate(root: Path, saves: int = 4, safe: bool = True) -> Path:
    """Accelerator.save_state() into checkpoints/checkpoint_<i> (automatic naming)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = root / ("acc_run" if safe else "acc_run_bin")
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out),
                                                                    automatic_checkpoint_naming=True,
                                                                    total_limit=None))
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    model, opt, sched = acc.prepare(model, opt, sched)
    for _ in range(saves):
        for x, y in _batches(2):
            opt.zero_grad()
            acc.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
        sched.step()
        acc.save_state(safe_serialization=safe)
    return out


def build_hf_trainer(root: Path, steps: int = 8, save_steps: int = 2) -> Path:
    """transformers.Trainer: output_dir/checkpoint-<step>/ every save_steps, then save_model()."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 30, (6,), generator=g), "labels": int(i % 2)} for i in range(16)]
    out = root / "hf_run"
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=save_steps,
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                             use_cpu=True, logging_steps=100, save_strategy="steps",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    return out


def build_timm(root: Path, epochs: int = 4) -> Path:
    """timm.utils.CheckpointSaver: checkpoint-<epoch>.pth.tar, last.pth.tar, model_best.pth.tar."""
    from timm.utils import CheckpointSaver

    out = root / "timm_run"
    out.mkdir(parents=True)
    model = _tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="tiny", lr=0.1, epochs=epochs)
    saver = CheckpointSaver(model=model, optimizer=opt, args=args, checkpoint_dir=str(out),
                            recovery_dir=str(out), decreasing=True, max_history=epochs + 1)
    for epoch in range(epochs):
        for x, y in _batches(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        saver.save_checkpoint(epoch, metric=float(3 - epoch))
    return out
