"""The pretraining loop: three contrastive losses, exact resume, safe checkpoints.

Resume is exact because everything random is a function of saved state: the
epoch order comes from (seed, epoch), each report's sentence sample from
(seed, epoch, item), dropout from the torch RNG state saved with the
checkpoint, and the data position is the number of batches of the current
epoch already consumed at the last optimizer step.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from afloc_cli.atomic import write_atomic
from afloc_cli.checkpoint.io import read_header, save_checkpoint
from afloc_cli.errors import AflocError, CheckpointError
from afloc_cli.image.data.transforms import normalize
from afloc_cli.text.data.sentences import PreparedText
from afloc_cli.vlp.model import AflocModel, build_model
from kernels.cpu import flush_denormals
from train.config import TrainConfig, differences, read_saved_config
from train.data import FrameCache, PretrainDataset, batches_for_rank
from train.distributed import DistInfo, gather, gather_padded
from train.ema import WeightAverage
from train.losses import global_loss, local_loss, scale_gradient
from train.text_features import FrozenTextFeatures

METRICS_FIELDS = ["step", "epoch", "loss", "loss_global", "loss_sentence", "loss_word", "lr", "images_per_s",
                  "val_loss"]


class NonFiniteLoss(AflocError):
    """The loss became NaN or infinite: the run stops, the last good checkpoint is kept."""


@dataclass
class TrainState:
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed up to the last optimizer step
    step: int = 0  # optimizer steps
    best: list[tuple[float, int]] = field(default_factory=list)  # (val loss, step) of kept best checkpoints


class _Forward(nn.Module):
    """What DDP wraps: one forward producing every embedding the losses need.

    The local levels come out before their 1x1 embedders, with the embedders' weights beside them: the
    local losses fold the weights into the texts (fewer products where the channels are fewer than the
    text's width). The weights are outputs so that DDP finds them used by the forward.
    """

    def __init__(self, model: AflocModel, levels: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x: torch.Tensor, text_batch: Any) -> tuple[Any, Any, dict[str, torch.Tensor]]:
        """`text_batch` None: the text features come from a frozen-encoder cache, outside the wrapped module."""
        text = None if text_batch is None else self.model.text_encoder(text_batch)
        image = self.model.encode_images(x, self.levels, project_local=False)
        projections = {k: w for k, w in self.model.image_encoder.local_projections().items() if k in self.levels}
        return image, text, projections


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def compute_losses(
    forward: nn.Module,
    model: AflocModel,
    frames: torch.Tensor,
    texts: list[PreparedText],
    cfg: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    precision: str,
    text_features: FrozenTextFeatures | None = None,
    word_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The three losses over the global batch (embeddings gathered from every rank), each with its weight.

    "total" is what is optimised: their sum, with the word loss further scaled by `word_scale` (the
    warm-in, see word_scale_at); the word entry itself stays unscaled, so logged values compare across steps.
    """
    lc = cfg.model.loss
    pre = cfg.model.preprocess
    x = normalize(frames.to(device), pre.mean, pre.std).contiguous()
    tb = None if text_features is not None else model.text_encoder.tokenize(texts).to(device)
    with _autocast(device, precision):
        img, txt, proj = forward(x, tb)
    if text_features is not None:
        txt = text_features(texts)
    out: dict[str, torch.Tensor] = {}
    zero = x.new_zeros(())
    chunk = cfg.local_chunk
    # bf16 training: the local losses' context product in bf16 too (similarities and softmaxes stay fp32).
    matmul_dtype = torch.bfloat16 if precision == "bf16" else None
    if lc.use_global:
        out["global"] = lc.weight_global * global_loss(
            gather(img.global_.float(), dist), gather(txt.report.float(), dist), lc.temp3
        )
    if lc.use_sentence:
        out["sentence"] = lc.weight_sentence * local_loss(
            gather(img.deep.float(), dist),
            gather_padded(txt.sentences.float(), dist),
            gather_padded(txt.sentence_mask, dist),
            lc.temp1, lc.temp2, lc.temp3, chunk_size=chunk, matmul_dtype=matmul_dtype, projection=proj["deep"],
        )
    if lc.use_word:
        # Before the word loss's warm-in it is only logged (no graph, so no backward through it), unless it is
        # the only loss and the step's total needs a graph to step on.
        logged_only = word_scale == 0.0 and (lc.use_global or lc.use_sentence)
        with torch.no_grad() if logged_only else contextlib.nullcontext():
            out["word"] = lc.weight_word * local_loss(
                gather(scale_gradient(img.shallow, cfg.optim.word_backbone_grad).float(), dist),
                gather_padded(txt.words.float(), dist),
                gather_padded(txt.word_mask, dist),
                lc.temp1, lc.temp2, lc.temp3, chunk_size=chunk, matmul_dtype=matmul_dtype, projection=proj["shallow"],
            )
    out["total"] = sum((word_scale * v if k == "word" else v for k, v in out.items()), zero)
    return out


def word_scale_at(step: int, warmup: int, start: int = 0) -> float:
    """The word loss's factor for optimizer step `step` (0-based): 0 before step `start`, then linear to 1 over
    `warmup` steps."""
    if step < start:
        return 0.0
    return 1.0 if warmup <= 0 else min(1.0, (step - start + 1) / warmup)


def levels_for(cfg: TrainConfig) -> tuple[str, ...]:
    lc = cfg.model.loss
    levels = [name for name, on in (("global", lc.use_global), ("deep", lc.use_sentence),
                                     ("shallow", lc.use_word)) if on]
    if not levels:
        raise AflocError("every loss is switched off: nothing to train")
    return tuple(levels)


def _collate(items: list[tuple[torch.Tensor, PreparedText]]) -> tuple[torch.Tensor, list[PreparedText]]:
    return torch.stack([f for f, _ in items]), [t for _, t in items]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The folder run_dir/checkpoints/last.json points at (the optimised weights and training state), if any."""
    pointer = run_dir / "checkpoints" / "last.json"
    if not pointer.is_file():
        return None
    try:
        return pointer.parent / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AflocError(f"unreadable checkpoint pointer: {exc}", path=pointer) from None


# Chosen by the machine or the loader, not by the recipe: a run trained on another CPU is still the recipe's.
MACHINE_SETTINGS = frozenset({"precision", "workers"})


def require_same_settings(run_dir: Path, cfg: TrainConfig, ignore: frozenset[str] = MACHINE_SETTINGS) -> None:
    """A script re-scoring a finished run must not pass off one recipe's model as another's: the run's saved
    settings must equal `cfg`'s, keys in `ignore` aside, or one line names the run and every difference."""
    folder = last_checkpoint(run_dir)
    if folder is None:
        raise AflocError("no checkpoint (checkpoints/last.json) to read the run's settings from", path=run_dir)
    changed = {k: v for k, v in differences(read_saved_config(folder), cfg).items() if k not in ignore}
    if changed:
        shown = ", ".join(f"{key} {old!r} (run) vs {new!r} (now)" for key, (old, new) in sorted(changed.items()))
        raise AflocError(f"trained under other settings: {shown}", path=run_dir,
                         hint="pass the run's settings with --set, or train it again")


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        cache: FrameCache,
        out: Path,
        *,
        dist: DistInfo | None = None,
        device: torch.device | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.out = out
        self.dist = dist or DistInfo()
        self.device = device or torch.device("cpu")
        self.log = log
        self.precision = resolve_precision(cfg.precision, self.device)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model).to(self.device)
        self.text_features: FrozenTextFeatures | None = None
        if cfg.freeze_text:
            for p in self.model.text_encoder.parameters():
                p.requires_grad_(False)
            self.text_features = FrozenTextFeatures(self.model.text_encoder, self.device,
                                                    max_bytes=cfg.text_cache_mb << 20)
        self.train_set = PretrainDataset(cache, "train", cfg.seed, cfg.report_sampling)
        self.val_set = PretrainDataset(cache, "val", cfg.seed, cfg.report_sampling)
        if len(self.train_set) < cfg.batch_size:
            raise AflocError(
                f"the train split has {len(self.train_set)} usable pairs, fewer than one batch of {cfg.batch_size}",
                path=cache.folder,
            )
        self.forward: nn.Module = _Forward(self.model, levels_for(cfg))
        if self.dist.enabled:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            self.forward = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=ids, find_unused_parameters=True
            )
        o = cfg.optim
        text_ids = {id(p) for p in self.model.text_encoder.parameters()}
        image_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in text_ids]
        text_params = [p for p in self.model.text_encoder.parameters() if p.requires_grad]
        groups = [{"params": image_params}]
        if text_params:  # a pretrained text model usually wants a smaller step than the image side from scratch
            groups.append({"params": text_params, "lr": o.lr if o.text_lr is None else o.text_lr})
        self.optimizer = torch.optim.Adam(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=o.step_gamma)
        self.scaler = torch.amp.GradScaler(enabled=self.precision == "fp16")
        # Built after the optimizer and drawing no random numbers, so it leaves the optimised weights alone.
        self.ema = WeightAverage(self.model, o.ema_decay, text_frozen=cfg.freeze_text) if o.ema_decay else None
        self.state = TrainState()
        self.ckpt_dir = out / "checkpoints"

    def _train_mode(self, on: bool) -> None:
        """A frozen text encoder stays in eval mode: fixed features, no dropout."""
        self.model.train(on)
        if self.cfg.freeze_text:
            self.model.text_encoder.eval()

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, tag: str | None = None) -> Path:
        """Write model + training state into a new folder, then point last.json at it (atomic)."""
        name = tag or f"step-{self.state.step:07d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_checkpoint(self.model, tmp / "model.safetensors", provenance=self._provenance())
        torch.save(
            {
                "state": dataclasses.asdict(self.state),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "ema": None if self.ema is None else self.ema.state_dict(),
            },
            tmp / "train_state.pt",
        )
        (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=list))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.ckpt_dir / "last.json"
        pointer_tmp = self.ckpt_dir / ".last.json.tmp"
        pointer_tmp.write_text(json.dumps({"checkpoint": name, "step": self.state.step}))
        os.replace(pointer_tmp, pointer)
        self._prune(name)
        return final

    def _provenance(self) -> dict[str, Any]:
        return {"train_step": self.state.step, "config": self.cfg.to_dict()}

    def _prune(self, last: str) -> None:
        """Keep the latest checkpoint and the best k by validation loss; remove the rest."""
        keep = {last} | {f"step-{step:07d}" for _, step in self.state.best}
        for folder in self.ckpt_dir.glob("step-*"):
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder)

    def resume(self) -> bool:
        folder = last_checkpoint(self.out)
        if folder is None:
            return False
        try:
            self.model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(self.device)))
        except RuntimeError as exc:  # the CLI resumes with the run's saved config, so only other callers get here
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise AflocError(f"the checkpoint's weights do not fit this config's model ({first})", path=folder,
                             hint="resume with the run's own settings (its config.json), or start a new run") from None
        blob = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
        st = blob["state"]
        self.state = TrainState(st["epoch"], st["batch_in_epoch"], st["step"], [tuple(b) for b in st["best"]])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        # The scheduler notes on the optimizer object, outside both state dicts, that optimizer.step() has run in
        # this process, and warns that a schedule value was skipped when it steps first. A resumed run has
        # stepped (its restored state says so), and the epoch's scheduler step can come first: at an epoch's end.
        if self.state.step > 0:
            self.optimizer._opt_called = True  # type: ignore[attr-defined]  # torch.optim.lr_scheduler's flag
        self.scaler.load_state_dict(blob["scaler"])
        if self.ema is not None:
            if blob.get("ema") is None:
                raise AflocError("this checkpoint was written without optim.ema_decay, so its weight average "
                                 "cannot be resumed exactly", path=folder,
                                 hint="resume with the run's own settings, or start a new run")
            try:
                self.ema.load_state_dict(blob["ema"])
            except ValueError as exc:
                raise AflocError(str(exc), path=folder) from None
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"]:
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        if self.dist.is_main:
            self.log(f"resumed from {folder} (step {self.state.step}, epoch {self.state.epoch})")
        return True

    def _record_val(self, val_loss: float) -> None:
        """Remember this step's validation loss; only the best k survive pruning."""
        self.state.best.append((val_loss, self.state.step))
        self.state.best.sort()
        self.state.best = self.state.best[: self.cfg.keep_best]

    # ---- validation --------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float | None:
        if len(self.val_set) < self.cfg.batch_size // self.dist.world or self.dist.enabled:
            return None
        self._train_mode(False)
        total, count = 0.0, 0
        bs = self.cfg.batch_size
        for b in range(min(self.cfg.val_batches, len(self.val_set) // bs)):
            items = [self.val_set[(i, 0)] for i in range(b * bs, (b + 1) * bs)]
            frames, texts = _collate(items)
            losses = compute_losses(self.forward, self.model, frames, texts, self.cfg, self.dist,
                                    self.device, self.precision, self.text_features)
            total += float(losses["total"])
            count += 1
        self._train_mode(True)
        return total / count if count else None

    # ---- the loop ------------------------------------------------------------------------------
    def _open_metrics(self) -> tuple[TextIO, csv.DictWriter]:
        """metrics.csv, holding exactly the rows up to the step this run starts from, open to append its rows.

        Rows of later steps are dropped: those steps run again. So is any line that is not a row, such as the
        second header every rank of a torchrun run wrote before only rank 0 touched the file. The file is
        replaced atomically, so an interrupt here never loses the rows already logged. Rank 0 only.
        """
        path = self.out / "metrics.csv"
        rows: list[dict[str, str]] = []
        if path.exists():
            dropped = 0
            with path.open(newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    step = row.get("step") or ""
                    if not step.isdigit() or None in row or None in row.values():  # not a row of this table
                        dropped += 1
                    elif int(step) <= self.state.step:
                        rows.append(row)
            if dropped:
                self.log(f"{path}: dropped {dropped} line(s) that were not rows (a repeated header, or a row "
                         "cut short)")

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                table = csv.DictWriter(f, fieldnames=METRICS_FIELDS, extrasaction="ignore")
                table.writeheader()
                table.writerows(rows)

        write_atomic(path, write)
        metrics = path.open("a", newline="", encoding="utf-8")
        return metrics, csv.DictWriter(metrics, fieldnames=METRICS_FIELDS)

    @flush_denormals()  # scoped: the process gets IEEE subnormals back afterwards
    def fit(self, on_step: Callable[[dict[str, float]], None] | None = None) -> TrainState:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.finished():  # checked before metrics.csv too, which it leaves as it is
            return self._already_finished()
        # Only rank 0 touches metrics.csv (the README's promise); the others log nothing.
        metrics, writer = self._open_metrics() if self.dist.is_main else (None, None)  # both set, or neither
        self._train_mode(True)
        accumulate = max(1, cfg.optim.accumulate)
        try:
            while self.state.epoch < cfg.epochs:
                batches = batches_for_rank(len(self.train_set), cfg.batch_size, cfg.seed, self.state.epoch,
                                           self.dist.rank, self.dist.world, start=self.state.batch_in_epoch)
                epoch = self.state.epoch
                sampler = [[(i, epoch) for i in b] for b in batches]
                # Its own generator, so creating the loader does not draw from the global RNG that
                # dropout uses: a resumed run then sees exactly the same random stream.
                loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                                    collate_fn=_collate, generator=torch.Generator().manual_seed(cfg.seed + epoch))
                consumed = self.state.batch_in_epoch
                tick = time.perf_counter()
                micro = 0
                for frames, texts in loader:
                    losses = compute_losses(self.forward, self.model, frames, texts, cfg, self.dist,
                                            self.device, self.precision, self.text_features,
                                            word_scale=word_scale_at(self.state.step, cfg.optim.word_warmup,
                                                                       cfg.optim.word_start))
                    total = losses["total"]
                    if not math.isfinite(float(total.detach())):
                        raise NonFiniteLoss(
                            f"loss is {float(total.detach())} at step {self.state.step + 1} (epoch {epoch}); stopping",
                            hint=f"the last good checkpoint is in {self.ckpt_dir}; lower the learning rate "
                            "or use fp32",
                        )
                    self.scaler.scale(total / accumulate).backward()
                    micro += 1
                    consumed += 1
                    if micro % accumulate:
                        continue
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.update()
                    self.state.step += 1
                    self.state.batch_in_epoch = consumed
                    now = time.perf_counter()
                    row: dict[str, Any] = {
                        "step": self.state.step,
                        "epoch": epoch,
                        "loss": float(total.detach()),
                        **{f"loss_{k}": float(losses[k].detach()) if k in losses else math.nan
                           for k in ("global", "sentence", "word")},
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": accumulate * cfg.batch_size / max(now - tick, 1e-9),
                        "val_loss": "",
                    }
                    tick = now
                    val = None
                    if cfg.val_every and self.state.step % cfg.val_every == 0:
                        val = self.validate()
                        row["val_loss"] = "" if val is None else val
                    if writer is not None:
                        writer.writerow(row)
                        metrics.flush()
                    if on_step is not None:
                        on_step(row)
                    if val is not None:
                        self._record_val(val)
                    if self.dist.is_main and (cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0):
                        self.save()
                    if self.finished():
                        return self._finish()
                self.optimizer.zero_grad(set_to_none=True)  # drop a trailing partial accumulation
                self.scheduler.step()
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                if not cfg.val_every:
                    val = self.validate()
                    if val is not None and writer is not None:
                        writer.writerow({"step": self.state.step, "epoch": epoch, "val_loss": val})
                        metrics.flush()
                        self._record_val(val)
                        self.save()
            return self._finish()
        except KeyboardInterrupt:
            if self.dist.is_main:
                folder = self.save()
                self.log(f"interrupted: saved {folder}; continue with --resume")
            raise
        finally:
            if metrics is not None:
                metrics.close()

    def finished(self) -> bool:
        """Whether the run has trained all it was set to: every epoch, or max_steps optimizer steps."""
        cfg = self.cfg
        return self.state.epoch >= cfg.epochs or (cfg.max_steps is not None and self.state.step >= cfg.max_steps)

    def _finish(self) -> TrainState:
        """Save the last checkpoint, then the run's model.safetensors from it (rank 0)."""
        if self.dist.is_main:
            self._write_model(self.save())
        return self.state

    def _already_finished(self) -> TrainState:
        """A resumed run that had finished trains nothing, and rewrites nothing: its checkpoint and its model are
        the run's, and the files (so their sha256, which outputs made with the model record) stay as they are.
        Only a model.safetensors missing or older than the last checkpoint (a run stopped between those two
        writes) is written, from that checkpoint."""
        if self.dist.is_main:
            folder = last_checkpoint(self.out)
            if folder is None or folder.name != f"step-{self.state.step:07d}":
                folder = self.save()  # not resumed: nothing of this step is saved yet
            if self._model_step() == self.state.step:
                self.log(f"{self.out}: the run already finished at step {self.state.step} (epoch "
                         f"{self.state.epoch}); nothing to train. To train on, resume with a larger --set epochs=N "
                         "or --set max_steps=N")
            else:
                self._write_model(folder)
        return self.state

    def _model_step(self) -> int | None:
        """The training step the run's model.safetensors was written at (None: no readable model)."""
        try:
            step = read_header(self.out / "model.safetensors").provenance.get("train_step")
        except CheckpointError:
            return None
        return step if isinstance(step, int) else None

    def _write_model(self, folder: Path) -> None:
        """The run's model.safetensors: the checkpoint's weights, or their average. Replaced atomically, so a kill
        never leaves half a model where _already_finished would take it for the finished one."""
        target = self.out / "model.safetensors"
        if self.ema is None:
            write_atomic(target, lambda tmp: shutil.copyfile(folder / "model.safetensors", tmp), fsync=True)
        else:  # the run's model is the average; the checkpoint folder keeps the optimised weights
            save_checkpoint(self.ema.averaged_model(), target, provenance={
                **self._provenance(), "weights": f"exponential moving average, decay {self.ema.decay}"})
