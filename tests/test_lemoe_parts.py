"""LEMoE training parts: chat rows share their template prefix's KV cache (issue 21 cost)."""

from __future__ import annotations

import pytest
import torch

from lemoe.methods.lemoe import parts
from lemoe.methods.training import LMBatch


def _batch(rows: list[list[int]], target_len: int = 1) -> LMBatch:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    tmask = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        tmask[i, len(r) - target_len : len(r)] = True
    return LMBatch(ids, attn, attn.bool() & ~tmask, tmask)


def test_chat_rows_share_their_prefix_and_parts_are_cut_to_length() -> None:
    head = [1, 2, 3, 4, 5, 6]
    rows = [[7, 8, 9], [10, 11, 12, 13], [*head, 20, 21, 22], [*head, 30, 31, 32, 33]]
    batch = _batch(rows)
    mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    mask[2, 6] = mask[3, 7] = True  # subject tokens after the prefix
    got = parts.split_shared_prefix(batch, mask, torch.tensor([False, False, True, True]))
    assert [p.rows.tolist() for p in got] == [[0, 1], [2, 3]]
    plain, chat = got
    assert plain.start == 0 and plain.batch.input_ids.shape == (2, 4)  # not padded to the chat rows
    assert chat.start == 6 and chat.prefix_ids.tolist() == [head]
    assert chat.batch.input_ids.tolist() == [[20, 21, 22, 0], [30, 31, 32, 33]]
    assert chat.mask.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_no_sharing_when_the_expert_acts_inside_the_prefix_or_rows_differ() -> None:
    head = [1, 2, 3, 4, 5, 6]
    batch = _batch([[*head, 20, 21], [*head, 30, 31]])
    mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    mask[0, 2] = True  # an expert position inside the common tokens: only 2 tokens may be shared
    got = parts.split_shared_prefix(batch, mask, torch.tensor([True, True]))
    assert len(got) == 1 and got[0].start == 0 and got[0].batch is batch
    other = _batch([[1, 2, 9, 9, 9, 9, 5], [1, 2, 3, 4, 5, 6, 7]])
    none = torch.zeros_like(other.input_ids, dtype=torch.bool)
    assert len(parts.split_shared_prefix(other, none, torch.tensor([True, True]))) == 1  # 2 < MIN_SHARED


@pytest.mark.slow
def test_shared_prefix_trains_the_same_expert(smollm2) -> None:
    """share_prefix only changes how the chat rows are computed: same steps, loss and expert."""
    from lemoe.methods import build_method
    from lemoe.requests import EditRequest

    model, tokenizer = smollm2
    reqs = [
        EditRequest(
            prompt="The mother tongue of Danielle Darrieux is", target_new="English", subject="Danielle Darrieux"
        ),
        EditRequest(prompt="Toko Yasuda plays the", target_new="piano", subject="Toko Yasuda"),
    ]
    out = {}
    for share in (True, False):
        opts = {"chat_system": None, "share_prefix": share, "steps": 4, "extra_steps": 0}
        method = build_method("lemoe", model, tokenizer, opts)
        report = method.apply(reqs)
        out[share] = (report.info["loss"], method.state_dict()["experts.w2"].clone())
        method.remove_hooks()
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-4)
    a, b = out[True][1], out[False][1]  # Adam magnifies float rounding a little; the same expert
    assert (a - b).norm() <= 1e-2 * a.norm()
