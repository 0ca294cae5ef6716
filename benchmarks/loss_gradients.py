"""Each loss's gradient norm at initialisation, in the learning benchmark's recipe.

Why the word-level loss can hold the others at chance from scratch: one
backward per loss on the first batches of a seed's data order, before any
step, and the norm of the gradient over the trainable (image-side) parameters.

    .venv/bin/python benchmarks/loss_gradients.py --cache /tmp/learning-5/cache --seed 4

Results are recorded in benchmarks/RESULTS.md ("Word-loss warm-in").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning import budget  # noqa: E402  (the benchmark's own recipe)

from afloc_cli.demo import training_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, required=True, help="a learning-benchmark cache (its --out/cache)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()

    from train.data import FrameCache, batches_for_rank
    from train.loop import Trainer, _collate, compute_losses

    cfg = training_config(budget(False).plan, seed=args.seed, losses="global,sent,word", workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, FrameCache(args.cache), Path(tmp))
    trainer._train_mode(True)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    order = batches_for_rank(len(trainer.train_set), cfg.batch_size, cfg.seed, 0, 0, 1)
    for b, indices in enumerate(order[: args.batches]):
        frames, texts = _collate([trainer.train_set[(i, 0)] for i in indices])
        norms = {}
        for name in ("global", "sentence", "word"):
            trainer.optimizer.zero_grad(set_to_none=True)
            losses = compute_losses(trainer.forward, trainer.model, frames, texts, cfg, trainer.dist,
                                    trainer.device, trainer.precision, trainer.text_features)
            losses[name].backward()
            grads = [p.grad.norm() ** 2 for p in params if p.grad is not None]
            norms[name] = (float(losses[name].detach()), float(torch.stack(grads).sum().sqrt()))
        print(f"batch {b}: " + ", ".join(f"{k} loss {v[0]:.3f} |grad| {v[1]:.1f}" for k, v in norms.items()))


if __name__ == "__main__":
    main()
