"""Where CoachHooK's validated hooks swap: on the edited prompts and on unrelated (locality) inputs.

Loads a saved CoachHooK state, runs the edited prompts and the locality probes (prompt + answer,
teacher-forced as the evaluator does) through the model with the validated hooks, and records per
hook layer each token's ``M_t = ‖(W_h − W_0) x_t‖`` and z-score as the hooks see them. Reports
which positions swap (first token, subject's last token, elsewhere), how far the edited token
stands out, and what alternative scope rules would have done on the same activations (offline: the
layers above still see the real swaps of the layers below).

With ``--rescope SCORE:Q ...`` it also re-scores the saved edits under other scope rules: per
layer from the bottom, α = the running minimum over the stream's batches (``--batch``) of the
Q-quantile of each prompt's largest score (what ``alpha_quantile=Q`` does during editing), then
Rel/Gen/Loc by the standard evaluator. ``null:P`` instead sets α per layer to the P-quantile of
the relative change over every token of generic text (the method's statistics corpus): a threshold
calibrated on unrelated text rather than on the edits (not a method option yet). Offline: the hook
weights are the saved run's, so this ranks rules; a real run with an option gives the numbers.

Usage: python benchmarks/coachhook_scope.py STATE_DIR --data counterfact:FILE --edits N
       [--batch 30] [--rescope zscore:0.0 relative:0.1 ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from lemoe.data import load_spec
from lemoe.evaluation import Evaluator
from lemoe.methods import load_method
from lemoe.methods.coachhook.hooks import relative_change, zscores
from lemoe.methods.locate.positions import sites
from lemoe.methods.locate.stats import load_corpus
from lemoe.models import load_model
from lemoe.models.access import weight_as_out_in
from lemoe.tokens import encode_pairs


def record_inputs(method: Any, ids: list[list[int]]) -> list[list[torch.Tensor]]:
    """Per hook layer, per sequence: the input of the output projection at every token."""
    seen: list[list[torch.Tensor]] = [[] for _ in method.hooks]
    handles = [
        h.module.register_forward_hook(lambda _m, args, _o, i=i: seen[i].append(args[0][0].detach().clone()))
        for i, h in enumerate(method.hooks)
    ]
    try:
        with torch.no_grad():
            for seq in ids:  # one at a time: no padding, exact positions
                method.model(input_ids=torch.tensor([seq]))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def layer_scores(method: Any, inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per layer, per sequence: M_t."""
    return [[(x @ h.delta.T).norm(dim=-1) for x in xs] for h, xs in zip(method.hooks, inputs, strict=True)]


def relative_scores(method: Any, inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Per layer, per sequence: the hook's relative change ``M_t / ‖W_0 x_t + b‖`` (as the hook
    computes it with ``scope_score="relative"``)."""
    out = []
    for h, xs in zip(method.hooks, inputs, strict=True):
        w0, bias = weight_as_out_in(h.module), getattr(h.module, "bias", None)
        rows = []
        for x in xs:
            base = x @ w0.T + (bias if bias is not None else 0)
            rows.append(relative_change((x @ h.delta.T).norm(dim=-1), base, torch.ones(len(x), dtype=torch.bool)))
        out.append(rows)
    return out


def separation(edit_at_subject: torch.Tensor, loc_max: torch.Tensor, keep: float = 0.9) -> float:
    """Share of locality sequences that would swap under the threshold letting ``keep`` of the
    edited prompts swap at their subject token (lower is better)."""
    tau = torch.quantile(edit_at_subject, 1 - keep)
    return float((loc_max >= tau).float().mean())


def z_of(m: torch.Tensor, skip_first: bool = False) -> torch.Tensor:
    valid = torch.ones_like(m, dtype=torch.bool)
    if skip_first:
        valid[0] = False
    return zscores(m[None], valid[None])[0]


def summarise(method: Any, edit_ids: list[list[int]], subj_pos: list[int], loc_ids: list[list[int]]) -> dict[str, Any]:
    in_edit = record_inputs(method, edit_ids)
    in_loc = record_inputs(method, loc_ids)
    ms_edit, ms_loc = layer_scores(method, in_edit), layer_scores(method, in_loc)
    rs_edit, rs_loc = relative_scores(method, in_edit), relative_scores(method, in_loc)
    out: dict[str, Any] = {"layers": [], "alpha": method.alphas}
    for li, (h, me, ml) in enumerate(zip(method.hooks, ms_edit, ms_loc, strict=True)):
        row: dict[str, Any] = {"layer": h.layer, "alpha": h.alpha}
        # how the first token compares with the rest
        row["edit_m_first_over_median"] = float(torch.tensor([float(m[0] / m[1:].median()) for m in me]).median())
        row["loc_m_first_over_median"] = float(torch.tensor([float(m[0] / m[1:].median()) for m in ml]).median())
        q = torch.tensor([0.1, 0.5, 0.9])
        for tag, se, sl in (("abs", me, ml), ("rel", rs_edit[li], rs_loc[li])):
            at_subj = torch.tensor([float(m[p]) for m, p in zip(se, subj_pos, strict=True)])
            loc_max = torch.tensor([float(m.max()) for m in sl])
            row[tag] = {
                "edit_at_subject_q": [float(v) for v in torch.quantile(at_subj, q)],
                "loc_max_q": [float(v) for v in torch.quantile(loc_max, q)],
                "loc_swap_share_keep90": separation(at_subj, loc_max, 0.9),
                "loc_swap_share_keep75": separation(at_subj, loc_max, 0.75),
            }
        for skip in (False, True):
            tag = "skip_first" if skip else "paper"
            ze = [z_of(m, skip) for m in me]
            zl = [z_of(m, skip) for m in ml]
            z_subj = torch.tensor([float(z[p]) for z, p in zip(ze, subj_pos, strict=True)])
            z_max_edit = torch.tensor([float(z.max()) for z in ze])
            z_max_loc = torch.tensor([float(z.max()) for z in zl])
            argmax_is_subj = sum(int(z.argmax()) == p for z, p in zip(ze, subj_pos, strict=True)) / len(ze)
            row[tag] = {
                "edit_z_subject_median": float(z_subj.median()),
                "edit_argmax_at_subject": argmax_is_subj,
                "edit_zmax_quantiles": [float(q) for q in torch.quantile(z_max_edit, torch.tensor([0.0, 0.1, 0.5]))],
                "loc_zmax_quantiles": [float(q) for q in torch.quantile(z_max_loc, torch.tensor([0.5, 0.9, 1.0]))],
                "loc_swap_share_at_alpha": float((z_max_loc >= h.alpha).float().mean()),
                "edit_swap_share_at_alpha": float((z_max_edit >= h.alpha).float().mean()),
                "loc_first_token_swaps": float(torch.tensor([float(z[0] >= h.alpha) for z in zl]).mean()),
            }
            if not skip:
                row["z_separation"] = {"loc_swap_share_keep90": separation(z_subj, z_max_loc, 0.9)}
        out["layers"].append(row)
        print(json.dumps(row), flush=True)
    return out


def null_alpha(method: Any, texts: list[list[int]], index: int, q: float) -> float:
    """The q-quantile of the relative change at hook ``index`` over every token of ``texts``."""
    ratios = relative_scores(method, record_inputs(method, texts))[index]
    return float(torch.quantile(torch.cat(ratios).double(), q))


def rescope(method: Any, requests: list[Any], batch: int, rules: list[str]) -> list[dict[str, Any]]:
    """Evaluate the saved hook weights under other scope rules (see the module docstring)."""
    evaluator = Evaluator(method.model, method.tokenizer, exact_match=False)
    with method.hooks_off():
        reference = evaluator.reference(requests)
    rows = [
        {
            "rule": "saved",
            "alpha": method.alphas,
            **evaluator.evaluate(requests, reference, method.forward_context).aggregate,
        }
    ]
    saved = [(h.score, h.alpha) for h in method.hooks]
    generic: list[list[int]] = []
    if any(r.startswith("null:") for r in rules):
        cfg = method.cfg
        with method.hooks_off():
            texts = load_corpus(
                cfg.stats_corpus, method.model, method.tokenizer, cfg.stats_samples, cfg.stats_max_tokens
            )
        generic = [method.tokenizer(t)["input_ids"][: cfg.stats_max_tokens] for t in texts]
    for rule in rules:
        score, _, q = rule.partition(":")
        for h in method.hooks:
            h.score, h.alpha = ("relative" if score == "null" else score), float("inf")
        for i, h in enumerate(method.hooks):
            if score == "null":
                h.alpha = null_alpha(method, generic, i, float(q))
                continue
            smax = method.prompt_max_z(requests, upto=i)[-1]
            h.alpha = min(
                float(torch.quantile(part[torch.isfinite(part)].double(), float(q)))
                for part in smax.split(batch)
                if torch.isfinite(part).any()
            )
        agg = evaluator.evaluate(requests, reference, method.forward_context).aggregate
        rows.append({"rule": rule, "alpha": method.alphas, **agg})
        print(json.dumps({k: v for k, v in rows[-1].items() if "exact" not in k}), flush=True)
    for h, (score, alpha) in zip(method.hooks, saved, strict=True):
        h.score, h.alpha = score, alpha
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state")
    parser.add_argument("--data", required=True)
    parser.add_argument("--edits", type=int, required=True)
    parser.add_argument("--batch", type=int, default=30, help="edits per batch of the saved run")
    parser.add_argument("--rescope", nargs="*", default=[], metavar="SCORE:Q")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tok = load_model()
    method = load_method(args.state, model, tok)
    requests = load_spec(args.data)[0][: args.edits]
    edit_sites = sites(tok, requests, ["{}"])
    edit_ids = [list(s[0].ids) for s in edit_sites]
    subj_pos = [s[0].index for s in edit_sites]
    probes = [p for r in requests for p in r.locality]
    enc = encode_pairs(tok, [p.prompt for p in probes], [p.answer for p in probes])
    loc_ids = [list(e.prompt_ids + e.answer_ids) for e in enc]
    result = summarise(method, edit_ids, subj_pos, loc_ids)
    result.update({"state": args.state, "data": args.data, "edits": args.edits})
    if args.rescope:
        result["rescope"] = rescope(method, requests, args.batch, args.rescope)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
