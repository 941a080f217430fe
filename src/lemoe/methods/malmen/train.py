"""Meta-training of the MALMEN / MEND-sum editor, with progress, validation, checkpoints and resume.

    lemoe train-editor --out DIR --counterfact counterfact_train.json \\
        [--zsre zsre_dev.json --zsre-range 300:500] --steps 100 --edits-per-step 16

(The options are defined in :mod:`lemoe.cli.train_editor`; ``python -m lemoe.cli.train_editor`` is
the same command.)

One meta-step: cache keys/value-gradients of ``n`` training edits (updating the running
normalisation), predict the shifts, apply them to the unedited model, then

    loss = NLL(target | paraphrase)  +  loc_coef * KL(unedited ‖ edited) on unrelated prompts,

back-propagate to the shifts ``G = ∂loss/∂S``, through the normal equation to the per-token value
differences, and re-run the hyper-network on the proxy loss (:meth:`MALMEN.backward_shifts`);
clip and take an Adam step. Training data come from training splits only (CounterFact train minus
a held-out validation tail, and an optional slice of ZsRE dev kept disjoint from what is
evaluated). ``DIR/editor`` is a normal saved method state (``load_method(DIR/editor)`` or
``--opt editor=DIR/editor``); ``DIR/trainer.json`` (+ ``.tensors``, no pickle) holds the optimiser
and step for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lemoe import fileio
from lemoe.evaluation import Evaluator
from lemoe.methods.base import EditMethod
from lemoe.methods.malmen.method import MALMEN
from lemoe.methods.training import build_lm_batch, token_nll
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.requests import EditRequest


def usable(requests: Sequence[EditRequest]) -> list[EditRequest]:
    """Training needs a paraphrase (generalisation) and a locality probe (KL) per edit."""
    return [r for r in requests if r.paraphrases and r.locality]


def load_zsre_slice(path: str, start: int, stop: int) -> list[EditRequest]:
    """Records ``start:stop`` of a MEND-format ZsRE file; records that fail validation (the dev file
    has one with an empty ``alt``) are skipped, since training needs no particular record."""
    from lemoe.data.loaders import zsre_record
    from lemoe.requests import InvalidRequestError, validate_request

    records = json.loads(Path(path).read_text(encoding="utf-8"))[start:stop]
    out = []
    for rec in records:
        try:
            req = zsre_record(rec)
            validate_request(req)
        except (InvalidRequestError, KeyError, TypeError, IndexError):
            continue
        out.append(req)
    return out


def _kl_unedited_to_edited(method: MALMEN, requests: Sequence[EditRequest], shifts: Any) -> torch.Tensor:
    """KL(unedited ‖ edited) per real token of the locality sequences. The blocks below the lowest
    edited layer are run once and reused for both forwards."""
    batch = build_lm_batch(
        method.tokenizer, [r.locality[0].prompt for r in requests], [r.locality[0].answer for r in requests]
    ).to(method.access.device)
    layer = method.layers[0]
    hidden, tuple_out = hidden_before_block(method.access, layer, batch.input_ids, batch.attention_mask)
    mask = batch.attention_mask.bool()
    with skip_frozen_blocks(method.access, layer, hidden, tuple_out):
        method.set_shifts(None)
        with torch.no_grad():
            ref = method.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        method.set_shifts(shifts)
        post = method.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    ref_logp = F.log_softmax(ref[mask].float(), -1)
    post_logp = F.log_softmax(post[mask].float(), -1)
    return F.kl_div(post_logp, ref_logp, log_target=True, reduction="batchmean")


def meta_step(method: MALMEN, requests: Sequence[EditRequest]) -> dict[str, float]:
    """Accumulate the meta-gradient of one batch of training edits into ``method.net``'s grads."""
    cfg = method.config
    requests = list(requests)
    projections = method.projections
    with method.build_cache(requests, update_norm=True) as cache:
        shifts = method.predict_shifts(cache)
        for p in projections:
            p.weight.grad = None
            p.weight.requires_grad_(True)
        try:
            prompts = [r.paraphrases[0] for r in requests]
            targets = [r.target_new for r in requests]
            if cfg.edit_loss_on_prompts:  # type: ignore[attr-defined]
                prompts += [r.prompt for r in requests]
                targets += [r.target_new for r in requests]
            gen_batch = build_lm_batch(method.tokenizer, prompts, targets).to(method.access.device)
            method.set_shifts(shifts)
            with torch.enable_grad():
                logits = method.model(
                    input_ids=gen_batch.input_ids, attention_mask=gen_batch.attention_mask, use_cache=False
                ).logits
                gen_loss = token_nll(logits, gen_batch).mean()
                gen_loss.backward()
                gen_acc = float(
                    ((logits[:, :-1].argmax(-1) == gen_batch.input_ids[:, 1:]) | ~gen_batch.target_mask[:, 1:])
                    .all(-1)
                    .float()
                    .mean()
                )
                del logits
                loc_loss = _kl_unedited_to_edited(method, requests, shifts)
                (cfg.loc_coef * loc_loss).backward()  # type: ignore[attr-defined]
            grad_shifts = method.weight_grads_as_shift()
        finally:
            for p in projections:
                p.weight.requires_grad_(False)
                p.weight.grad = None
            method.set_shifts(None)
        method.backward_shifts(cache, shifts, grad_shifts)
    return {
        "gen_loss": float(gen_loss.detach()),
        "loc_loss": float(loc_loss.detach()),
        "gen_success": gen_acc,
        "tokens": shifts.n_tokens,
        "shift_norm": sum(float(s.norm()) for s in shifts.shifts) / len(shifts.shifts),
    }


def validate(method: EditMethod, requests: Sequence[EditRequest], evaluator: Evaluator) -> dict[str, float]:
    """Edit the validation edits in one batch, score them with the project's evaluator, undo."""
    reference = evaluator.reference(requests)
    method.reset()
    method.apply(list(requests))
    try:
        return evaluator.evaluate(requests, reference).aggregate
    finally:
        method.reset()


def make_optimizer(method: MALMEN) -> torch.optim.Adam:
    """Adam over the hyper-network; the per-module step sizes and log lambdas get their own lr."""
    cfg = method.config
    scalars = [p for n, p in method.net.named_parameters() if n.rsplit(".", 1)[-1] in ("lr", "log_lambda")]
    ids = {id(p) for p in scalars}
    rest = [p for p in method.net.parameters() if id(p) not in ids]
    return torch.optim.Adam(
        [{"params": rest, "lr": cfg.meta_lr}, {"params": scalars, "lr": cfg.meta_lr_scalars}]  # type: ignore[attr-defined]
    )


def _save_trainer(path: Path, state: dict[str, Any]) -> None:
    """Trainer state as JSON + safetensors (:func:`lemoe.fileio.save_tree`): no pickle, so a run
    folder from elsewhere cannot execute code on ``--resume``."""
    fileio.save_tree(path, state, to_json=lambda v: str(v) if isinstance(v, Path) else _unstorable(v))


def _unstorable(value: Any) -> Any:
    raise TypeError(f"trainer state holds a {type(value).__name__}, which is not stored")


def train(args: argparse.Namespace) -> int:
    """Run (or with ``args.resume`` continue) a meta-training run from parsed :func:`add_arguments` options."""
    from lemoe.data import load_requests
    from lemoe.methods import build_method
    from lemoe.models import load_model

    out = Path(args.out)
    if (out / "trainer.pt").exists():
        raise SystemExit(
            f"{out / 'trainer.pt'}: a trainer state of an older lemoe (a pickle, which is not loaded); "
            "start a new run in another --out (its editor/ and best/ folders still load)"
        )
    trainer_path = out / "trainer.json"
    if trainer_path.exists() and not args.resume:
        raise SystemExit(f"{out} already holds a training run; pass --resume to continue it or use another --out")
    saved = None
    if args.resume and trainer_path.exists():
        try:  # read and checked before anything is loaded or written
            saved = fileio.load_tree(trainer_path)
        except ValueError as e:
            raise SystemExit(f"cannot resume: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {}
    for item in args.opt:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--opt expects KEY=VALUE, got {item!r}")
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value

    counterfact = usable(load_requests("counterfact", args.counterfact))
    if len(counterfact) <= args.val_size:
        raise SystemExit(f"{args.counterfact}: only {len(counterfact)} usable records for --val-size {args.val_size}")
    pool, val = counterfact[: -args.val_size], counterfact[-args.val_size :]
    if args.zsre:
        start, stop = args.zsre_range
        pool += usable(load_zsre_slice(args.zsre, start, stop))
    order = list(range(len(pool)))
    random.Random(args.seed).shuffle(order)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    method: MALMEN = build_method(args.method, model, tokenizer, options)  # type: ignore[assignment]
    params = list(method.net.parameters())
    optimizer = make_optimizer(method)
    evaluator = Evaluator(model, tokenizer, exact_match=False)
    step, history, best = 0, [], None
    if saved is not None:
        method = type(method).from_pretrained(out / "editor", model, tokenizer)
        params = list(method.net.parameters())
        optimizer = make_optimizer(method)
        optimizer.load_state_dict(saved["optimizer"])
        step, history, best = saved["step"], saved["history"], saved.get("best")
        torch.set_rng_state(saved["torch_rng"])
        print(f"resumed at step {step} from {out}", flush=True)

    def checkpoint() -> None:
        method.save_pretrained(out / "editor")
        _save_trainer(
            trainer_path,
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best": best,
                "torch_rng": torch.get_rng_state(),
                "args": {k: v for k, v in vars(args).items() if not callable(v)},  # not a CLI dispatch function
                "options": options,
            },
        )

    # On resume the log restarts from the checkpoint's history (steps after it were not kept).
    log = open(out / "log.jsonl", "w")  # noqa: SIM115 - open for the whole run
    for stats in history:
        log.write(json.dumps(stats) + "\n")
    method.net.requires_grad_(True)
    t_start = time.perf_counter()
    try:
        while step < args.steps:
            n = args.edits_per_step
            idx = [order[(step * n + i) % len(order)] for i in range(n)]
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            stats = meta_step(method, [pool[i] for i in idx])
            grad_norm = torch.nn.utils.clip_grad_norm_(params, method.config.max_grad_norm)  # type: ignore[attr-defined]
            optimizer.step()
            step += 1
            stats.update(step=step, grad_norm=float(grad_norm), seconds=time.perf_counter() - t0)
            if step % args.val_every == 0 or step == args.steps:
                method.net.requires_grad_(False)
                val_scores = validate(method, val, evaluator)
                method.net.requires_grad_(True)
                stats["val"] = val_scores
                score = sum(
                    val_scores.get(k, 0.0)
                    for k in ("reliability.token_acc", "generality.token_acc", "locality.agreement")
                )
                if best is None or score > best["score"]:
                    best = {"step": step, "score": score, "val": val_scores}
                    method.save_pretrained(out / "best")
            history.append(stats)
            log.write(json.dumps(stats) + "\n")
            log.flush()
            print(
                f"step {step}/{args.steps} gen_loss {stats['gen_loss']:.3f} loc_kl {stats['loc_loss']:.4f} "
                f"gen_succ {stats['gen_success']:.2f} |grad| {stats['grad_norm']:.3g} "
                f"{stats['seconds']:.1f}s" + (f" val {stats['val']}" if "val" in stats else ""),
                flush=True,
            )
            if step % args.save_every == 0 or step == args.steps:
                checkpoint()
    finally:
        log.close()
    print(f"done: {step} steps in {time.perf_counter() - t_start:.0f}s this session; editor at {out / 'editor'}")
    return 0


if __name__ == "__main__":  # the command recorded in older results pages; the CLI module owns it now
    from lemoe.cli.train_editor import main

    sys.exit(main())
