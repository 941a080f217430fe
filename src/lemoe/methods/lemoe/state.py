"""What the edits produced: the frozen experts, the router's keys, and which batch and requests each
expert holds. One object, so that adding, removing (rollback), saving and loading an expert change
all of it together. Calibration is not here: it depends on the base model only (:mod:`.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lemoe.methods.base import StateError
from lemoe.methods.lemoe.experts import Expert, ExpertBank
from lemoe.methods.lemoe.routing import SLOT_FIELDS, Router

EXPERT_FIELDS = ("w1", "b1", "w2", "b2")
REQUIRED = [f"experts.{k}" for k in EXPERT_FIELDS] + [
    f"router.{k}" for k in ("keys", "key_expert", "mean", "std", "threshold")
]


@dataclass
class Edits:
    bank: ExpertBank
    router: Router
    expert_batches: list[int] = field(default_factory=list)  # the batch index each expert was trained on
    expert_requests: list[list[str]] = field(default_factory=list)  # request ids per expert

    @classmethod
    def empty(cls, d_in: int, d_out: int, width: int, d_route: int, dtype: torch.dtype, device: torch.device) -> Edits:
        return cls(ExpertBank.empty(d_in, d_out, width, dtype, device), Router.empty(d_route, device))

    def __len__(self) -> int:
        return len(self.bank)

    def add_expert(self, expert: Expert, batch_index: int, request_ids: list[str], *, shared: bool) -> int:
        """Store a trained expert (a new one, or expert 0 replaced in shared mode); its index."""
        if shared and len(self.bank):
            self.bank = self.bank.replace(0, expert)
            self.expert_requests[0].extend(request_ids)
            return 0
        self.bank = self.bank.append(expert)
        self.expert_batches.append(batch_index)
        self.expert_requests.append(list(request_ids))
        return len(self.bank) - 1

    def remove_batch(self, batch_index: int) -> None:
        """Remove the expert trained on ``batch_index`` and its keys; every other one is untouched."""
        if batch_index not in self.expert_batches:
            raise KeyError(f"no expert for batch {batch_index} (have {self.expert_batches})")
        p = self.expert_batches.index(batch_index)
        self.bank = self.bank.remove(p)
        self.router.remove_expert(p)
        del self.expert_batches[p]
        del self.expert_requests[p]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"experts.{k}": v for k, v in self.bank.tensors().items()}, **self.router.tensors()}

    def meta(self) -> dict[str, Any]:
        return {
            "n_experts": len(self.bank),
            "expert_batches": list(self.expert_batches),
            "expert_requests": [list(r) for r in self.expert_requests],
            "next_key": self.router.next_key,
        }

    @staticmethod
    def append_only_keys(shared: bool) -> list[str]:
        """State entries that only grow by appending until a reset, load or rollback. In shared-expert
        mode expert 0 and its request list change every batch, so they are not among them."""
        keys = [f"router.{k}" for k in ("keys", "key_expert", *SLOT_FIELDS)]
        if not shared:
            keys += [f"experts.{k}" for k in EXPERT_FIELDS] + ["expert_batches", "expert_requests"]
        return keys

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        meta: dict[str, Any],
        *,
        dims: tuple[int, int, int, int],
        subject: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Edits:
        """Edits from a saved state, checked against this model and config (``dims``: d_in, d_out,
        expert width, routing width); :class:`StateError` names what does not fit."""
        missing = [k for k in REQUIRED if k not in state]
        if missing:
            raise StateError(f"LEMoE state misses {missing}")
        d_in, d_out, width, d = dims
        w1, b1, w2, b2 = (state[f"experts.{k}"] for k in EXPERT_FIELDS)
        n = w1.shape[0] if w1.dim() == 3 else -1
        shapes_ok = (
            w1.shape == (n, width, d_in)
            and b1.shape == (n, width)
            and w2.shape == (n, d_out, width)
            and b2.shape == (n, d_out)
            and state["router.mean"].shape == (d,)
            and state["router.std"].shape == (d,)
            and state["router.threshold"].numel() == 1
        )
        batches, reqs = meta.get("expert_batches"), meta.get("expert_requests")
        meta_ok = isinstance(batches, list) and isinstance(reqs, list) and len(batches) == n == len(reqs)
        if not (shapes_ok and meta_ok):
            raise StateError("LEMoE state does not match this config/model (shapes or metadata inconsistent)")
        router = Router.from_state(state, meta, subject=subject, d=d, n_experts=n).to(device)
        bank = ExpertBank(*(t.to(device=device, dtype=dtype) for t in (w1, b1, w2, b2)))
        return cls(bank, router, [int(b) for b in batches], [list(r) for r in reqs])
