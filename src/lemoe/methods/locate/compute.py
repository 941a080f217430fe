"""Keys, current hidden states and target hidden vectors: the "locate" half of locate-then-edit.

- :func:`compute_ks`: the input of a layer's MLP output projection at each request's subject
  token, averaged over context prefixes (MEMIT's keys ``k``);
- :func:`block_outputs`: the residual stream after a block at the subject token (``h_L``);
- :func:`compute_z`: the residual-stream vector at the last edited layer that makes the model say
  the target (MEMIT's ``compute_z``: NLL on the target + KL on "<subject> is a" + weight decay,
  norm clamp), optimised for a whole batch at once with one free vector per request.

Every pass stops at the block it needs, and ``compute_z`` reruns only the blocks above the edited
layer (the frozen lower blocks are computed once), which matters on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lemoe.batching import pad_id, pad_right
from lemoe.methods.locate.config import LocateConfig
from lemoe.methods.locate.positions import Site, sites, token_index_of_char
from lemoe.models.access import ModelAccess
from lemoe.models.frozen import hidden_before_block, skip_frozen_blocks
from lemoe.requests import EditRequest


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed activation is captured."""


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _read_at(
    access: ModelAccess, module: nn.Module, flat: Sequence[Site], tokenizer: object, batch_size: int, *, pre: bool
) -> torch.Tensor:
    """Activation of ``module`` (its input if ``pre``, else its output) at each site's index."""
    out: list[torch.Tensor] = []
    captured: dict[str, torch.Tensor] = {}

    def grab_in(_m: nn.Module, args: tuple[Any, ...]) -> None:
        captured["x"] = args[0]
        raise _Stop

    def grab_out(_m: nn.Module, _args: Any, output: Any) -> None:
        captured["x"] = _first(output)
        raise _Stop

    for chunk in _chunks(flat, batch_size):
        ids, mask = pad_right([s.ids for s in chunk], pad_id(tokenizer))
        handle = module.register_forward_pre_hook(grab_in) if pre else module.register_forward_hook(grab_out)
        try:
            access.model(input_ids=ids.to(access.device), attention_mask=mask.to(access.device), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        x = captured["x"].reshape(len(chunk), ids.shape[1], -1)  # OPT flattens tokens to [B*T, d]
        index = torch.tensor([s.index for s in chunk], device=x.device)
        out.append(x[torch.arange(len(chunk), device=index.device), index].float())
    return torch.cat(out)


def template_keys(
    access: ModelAccess,
    tokenizer: object,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 32,
) -> torch.Tensor:
    """Keys per template ``[n, len(templates), d_in]``: MLP output-projection inputs at each
    subject's last token in each template (each holds ``{}`` where the prompt goes)."""
    rows = sites(tokenizer, requests, templates)
    flat = [s for row in rows for s in row]
    keys = _read_at(access, access.mlp(layer).out_proj, flat, tokenizer, batch_size, pre=True)
    return keys.view(len(requests), len(templates), -1)


def compute_ks(
    access: ModelAccess,
    tokenizer: object,
    layer: int,
    requests: Sequence[EditRequest],
    templates: Sequence[str] = ("{}",),
    batch_size: int = 32,
) -> torch.Tensor:
    """Keys ``[n, d_in]``: :func:`template_keys` averaged over the templates."""
    return template_keys(access, tokenizer, layer, requests, templates, batch_size).mean(1)


def block_outputs(
    access: ModelAccess, tokenizer: object, layer: int, requests: Sequence[EditRequest], batch_size: int = 32
) -> torch.Tensor:
    """Residual stream ``[n, d]`` after block ``layer`` at each subject's last token (bare prompt)."""
    flat = [row[0] for row in sites(tokenizer, requests, ["{}"])]
    return _read_at(access, access.blocks[layer], flat, tokenizer, batch_size, pre=False)


@dataclass
class _ZBatch:
    ids: torch.Tensor
    mask: torch.Tensor
    owner: torch.Tensor  # request (within the chunk) of each row
    index: torch.Tensor  # token where the delta is added
    is_kl: torch.Tensor  # row is a KL prompt ("<subject> is a")
    nll_rows: torch.Tensor  # (row, position, label) triples of target tokens
    nll_pos: torch.Tensor
    nll_label: torch.Tensor


def _z_batch(tokenizer: object, requests: Sequence[EditRequest], templates: Sequence[str]) -> _ZBatch:
    seqs: list[list[int]] = []
    owner, index, is_kl = [], [], []
    nll_rows, nll_pos, nll_label = [], [], []
    for i, (r, row) in enumerate(zip(requests, sites(tokenizer, requests, templates), strict=True)):
        answer = tokenizer(" " + r.target_new.lstrip(), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        for site in row:
            seq = list(site.ids) + list(answer)
            for j, tok in enumerate(answer):
                nll_rows.append(len(seqs))
                nll_pos.append(len(site.ids) + j - 1)  # the logit at p predicts token p + 1
                nll_label.append(tok)
            seqs.append(seq)
            owner.append(i)
            index.append(site.index)
            is_kl.append(False)
        if r.subject is not None:  # no subject: no KL prompt (its only token would be the edit site)
            text = f"{r.subject} is a"
            ids, idx = token_index_of_char(tokenizer, text, len(r.subject))
            seqs.append(ids)
            owner.append(i)
            index.append(idx)
            is_kl.append(True)
    ids, mask = pad_right(seqs, pad_id(tokenizer))
    t = torch.tensor
    return _ZBatch(ids, mask, t(owner), t(index), t(is_kl), t(nll_rows), t(nll_pos), t(nll_label))


def _lm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()  # type: ignore[operator]
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def compute_z(
    model: nn.Module,
    access: ModelAccess,
    tokenizer: object,
    requests: Sequence[EditRequest],
    layer: int,
    config: LocateConfig,
    templates: Sequence[str] = ("{}",),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Target residual vectors ``[n, d]`` after block ``layer`` (MEMIT's ``compute_z``).

    Requests are independent (each has its own free vector and its own rows), so optimising them
    together in chunks of ``config.z_batch_size`` gives the same result as one at a time.
    """
    zs, nlls, steps = [], [], []
    for chunk in _chunks(list(requests), config.z_batch_size):
        z, nll, n_steps = _compute_z_chunk(model, access, tokenizer, chunk, layer, config, templates)
        zs.append(z)
        nlls.append(nll)
        steps.append(n_steps)
    nll_all = torch.cat(nlls)
    return torch.cat(zs), {
        "z_nll_mean": float(nll_all.mean()),
        "z_nll_max": float(nll_all.max()),
        "z_steps": max(steps),
    }


def _compute_z_chunk(
    model: nn.Module,
    access: ModelAccess,
    tokenizer: object,
    requests: Sequence[EditRequest],
    layer: int,
    cfg: LocateConfig,
    templates: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    device = access.device
    b = _z_batch(tokenizer, requests, templates)
    ids, mask = b.ids.to(device), b.mask.to(device)
    cached, tuple_out = hidden_before_block(access, layer, ids, mask)
    n, d = len(requests), access.hidden_size
    delta = torch.zeros(n, d, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    init = torch.zeros(n, d, device=device)  # h_L at the bare prompt's site, before any change
    init_kl: torch.Tensor | None = None
    active = torch.ones(n, dtype=torch.bool)
    last_nll = torch.full((n,), float("nan"))
    base = model.base_model  # type: ignore[attr-defined]
    steps_run = 0
    first_row = torch.zeros(n, dtype=torch.long)
    for row in range(len(b.owner) - 1, -1, -1):
        if not b.is_kl[row]:
            first_row[b.owner[row]] = row  # ends at each request's first (bare-prompt) row

    for step in range(cfg.v_steps + 1):
        rows = torch.nonzero(active[b.owner]).squeeze(-1)
        row_map = torch.full((len(b.owner),), -1, dtype=torch.long)
        row_map[rows] = torch.arange(len(rows))
        own, idx = b.owner[rows].to(device), b.index[rows].to(device)

        def add_delta(
            _m: nn.Module,
            _args: Any,
            output: Any,
            own: torch.Tensor = own,
            idx: torch.Tensor = idx,
            first: bool = step == 0,
            row_map: torch.Tensor = row_map,
        ) -> Any:
            h = _first(output)
            if first:
                # index on the CPU (where the row bookkeeping lives), then move the indices
                init.copy_(h[row_map[first_row].to(device), b.index[first_row].to(device)].detach().float())
            add = torch.zeros_like(h).index_put((torch.arange(len(own), device=device), idx), delta[own].to(h.dtype))
            h = h + add
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = access.blocks[layer].register_forward_hook(add_delta)
        try:
            with skip_frozen_blocks(access, layer, cached[rows], tuple_out):
                final = base(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False)[0]
        finally:
            handle.remove()

        # NLL of the target tokens, mean per row, then mean over a request's rows.
        sel = row_map[b.nll_rows] >= 0
        r_local = row_map[b.nll_rows[sel]].to(device)
        logp = F.log_softmax(_lm_head(model, final[r_local, b.nll_pos[sel].to(device)]), -1)
        tok_nll = -logp.gather(-1, b.nll_label[sel].to(device)[:, None]).squeeze(-1)
        row_nll = torch.zeros(len(rows), device=device).index_add(0, r_local, tok_nll)
        row_cnt = torch.zeros(len(rows), device=device).index_add(0, r_local, torch.ones_like(tok_nll))
        lm_rows = row_cnt > 0
        req_nll = torch.zeros(n, device=device).index_add(0, own[lm_rows], row_nll[lm_rows] / row_cnt[lm_rows])
        req_rows = torch.zeros(n, device=device).index_add(
            0, own[lm_rows], torch.ones(int(lm_rows.sum()), device=device)
        )
        req_nll = req_nll / req_rows.clamp(min=1)

        # KL of "<subject> is a" at the subject token versus the first (unchanged) pass.
        kl_rows = b.is_kl[rows].to(device)
        kl = torch.zeros(n, device=device)
        if bool(kl_rows.any()):
            kl_logp = F.log_softmax(_lm_head(model, final[kl_rows, idx[kl_rows]]), -1)
            if init_kl is None:
                init_kl = torch.zeros(n, kl_logp.shape[-1], device=device)
                init_kl[own[kl_rows]] = kl_logp.detach()
            ref = init_kl[own[kl_rows]]
            per = (ref.exp() * (ref - kl_logp)).sum(-1)
            kl = kl.index_add(0, own[kl_rows], per)
        decay = cfg.v_weight_decay * delta.norm(dim=-1) ** 2 / init.norm(dim=-1).clamp(min=1e-6) ** 2
        loss = req_nll + cfg.kl_factor * kl + decay

        with torch.no_grad():
            act = active.to(device)
            last_nll[act.cpu()] = req_nll[act].detach().cpu()
            done = act & (req_nll.detach() < cfg.v_stop_nll)
            active &= ~done.cpu()
        if step == cfg.v_steps or not bool(active.any()):
            break
        (grad,) = torch.autograd.grad(loss[active.to(device)].sum(), [delta])
        frozen = delta.detach().clone()
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps_run += 1
        with torch.no_grad():
            keep = ~active.to(device)
            delta[keep] = frozen[keep]  # Adam momentum must not move finished requests
            limit = cfg.clamp_norm_factor * init.norm(dim=-1, keepdim=True)
            norm = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm)))
    return (init + delta.detach()), last_nll, steps_run
