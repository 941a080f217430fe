"""Hand an edited model to another engine: ``lemoe export STATE_OR_STORE OUT``.

Two kinds of output, decided by what the method leaves on the model once its state is loaded:

- **merged**: the method only changed weights (FT, MEMIT, AlphaEdit, O-Edit, MALMEN): ``OUT`` is a
  standard Hugging Face checkpoint (``config.json`` + safetensors + tokenizer) that plain
  ``transformers`` — and so vLLM or any engine that reads HF checkpoints — loads with no lemoe
  import, and whose logits are the edited model's.
- **adaptor**: the method acts through forward hooks (LEMoE's routed experts, CoachHooK's hook
  layers): ``OUT`` holds the base model's name and fingerprint and the method's saved state
  (``adaptor/``), loaded by one call, :func:`load_edited`. It cannot be merged into weights: the
  hooks decide *per input* whether and which edit applies (LEMoE routes each prompt to one expert or
  to none), and no fixed change of the weights reproduces a function that is off for unrelated
  inputs and on for edited ones.

Both carry ``lemoe_export.json`` saying which kind it is and where it came from.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lemoe import fileio

EXPORT_FILE = "lemoe_export.json"


def _hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def export_edited(source: str | Path, out: str | Path, *, model: str | None = None, device: str = "cpu") -> dict:
    """Export a saved state (``lemoe run --save-state``, ``store export``) or a store to ``out``."""
    from lemoe.methods import load_method
    from lemoe.methods.base import read_state_meta
    from lemoe.models import load_model
    from lemoe.models.builtin import DEFAULT_MODEL

    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; export into a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="lemoe-export-") as tmp:
        if (source / "store.json").is_file() and not (source / "state.safetensors").is_file():
            from lemoe.store import EditStore

            with EditStore.open(source, device=device) as store:  # a store: its current edited state
                state_dir = store.export(Path(tmp) / "state")
                model = model or store.spec.model
        elif (source / "config.json").is_file() and (source / "state.safetensors").is_file():
            state_dir = source
            if model is None and (source / "store.json").is_file():  # a `store export` folder
                model = json.loads((source / "store.json").read_text())["model"]
        else:
            raise ValueError(f"{source}: neither a saved method state (config.json + state.safetensors) nor a store")
        model = model or DEFAULT_MODEL
        meta = read_state_meta(state_dir)
        base, tokenizer = load_model(model, device=device)
        hooks_before = _hook_count(base)
        load_method(str(state_dir), base, tokenizer)  # edits the weights or installs its hooks
        adaptor = _hook_count(base) > hooks_before
        info = {
            "format_version": 1,
            "kind": "adaptor" if adaptor else "merged",
            "method": meta["method"],
            "base_model": model,
            "base_fingerprint": meta["model"],
            "source": str(source.resolve()),
        }
        with fileio.atomic_directory(out, replace=out.exists()) as folder:
            if adaptor:
                shutil.copytree(state_dir, folder / "adaptor")
                info["why_not_merged"] = (
                    "the method acts through forward hooks that decide per input whether an edit applies; "
                    "no fixed weight change reproduces that, so the base model and the adaptor state are kept apart"
                )
            else:
                base.save_pretrained(folder)
                tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
            fileio.write_json(folder / EXPORT_FILE, info)
    return info


def load_edited(folder: str | Path, *, device: str = "cpu") -> tuple[Any, Any, Any]:
    """Load an export: ``(model, tokenizer, method)``; ``method`` is None for a merged checkpoint
    (the model is then a plain ``transformers`` model)."""
    from lemoe.methods import load_method
    from lemoe.models import load_model

    folder = Path(folder)
    try:
        info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: not a lemoe export ({EXPORT_FILE}: {e})") from None
    if info.get("kind") == "merged":
        model, tokenizer = load_model(str(folder), device=device)
        return model, tokenizer, None
    if info.get("kind") == "adaptor":
        model, tokenizer = load_model(info["base_model"], device=device)
        return model, tokenizer, load_method(str(folder / "adaptor"), model, tokenizer)
    raise ValueError(f"{folder}/{EXPORT_FILE}: unknown kind {info.get('kind')!r}")
