"""The shared padding helpers: values, masks, dtypes, the pad-id rule, errors and device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lemoe.batching import pad_id, pad_left, pad_right


def test_pad_right_values_and_mask() -> None:
    ids, mask = pad_right([[5, 6, 7], [8], (9, 10)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_pad_right_uses_given_pad_id_and_keeps_natural_positions() -> None:
    ids, mask = pad_right([[1, 2], [3, 4, 5, 6]], pad_id=49152)
    assert ids[0].tolist() == [1, 2, 49152, 49152]
    # right padding: the positions a model infers from the mask are 0..n-1 for every row
    assert ((mask.cumsum(-1) - 1) * mask).tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]


def test_pad_left_values_and_mask() -> None:
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


def test_pad_accepts_empty_rows_and_tensors() -> None:
    ids, mask = pad_right([[], torch.tensor([3, 4])], pad_id=1)
    assert ids.tolist() == [[1, 1], [3, 4]]
    assert mask.tolist() == [[0, 0], [1, 1]]


@pytest.mark.parametrize("pad", [pad_right, pad_left])
def test_empty_batch_is_an_error(pad) -> None:
    with pytest.raises(ValueError, match="empty batch"):
        pad([], pad_id=0)


@pytest.mark.parametrize("pad", [pad_right, pad_left])
def test_device(pad) -> None:
    ids, mask = pad([[1, 2], [3]], 0)
    assert ids.device.type == "cpu" and mask.device.type == "cpu"
    ids, mask = pad([[1, 2], [3]], 0, device="meta")  # any device: tensors land there
    assert ids.device.type == "meta" and mask.device.type == "meta"
    assert ids.shape == mask.shape == (2, 2) and ids.dtype == torch.long
    if torch.cuda.is_available():
        ids, mask = pad([[1, 2], [3]], 0, device="cuda")
        assert ids.is_cuda and mask.is_cuda and ids.cpu().tolist()[0] == [1, 2]


def test_pad_id_rule() -> None:
    tok = SimpleNamespace
    assert pad_id(tok(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(tok(pad_token_id=0, eos_token_id=7)) == 0  # 0 is a real pad id, not "missing"
    assert pad_id(tok(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(tok(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id(object()) == 0
    # the evaluator / training rule: no EOS fallback
    assert pad_id(tok(pad_token_id=None, eos_token_id=7), eos_fallback=False) == 0
    assert pad_id(tok(pad_token_id=3, eos_token_id=7), eos_fallback=False) == 3
