"""The router's state (anchor keys and which expert each belongs to) and its decisions.

:mod:`.router` holds the scoring maths as pure functions; this class holds the key table they
score against and turns scores into decisions: one expert per sequence, per token, or per clause
(:mod:`.segments`). ``route_key=prompt`` keeps one pooled embedding per key. ``route_key=subject``
keeps one row per subject *token* ("slot") with the key it belongs to, its offset from the key's
last token and the key's own threshold. Every change binds new tensors (``torch.cat``, indexing),
so a copy of the state taken earlier is never altered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lemoe.methods.base import StateError
from lemoe.methods.lemoe import router, segments
from lemoe.methods.lemoe.calibration import TokenBatch
from lemoe.methods.lemoe.index import SlotIndex
from lemoe.methods.lemoe.rows import RowBuffer, append_rows

SLOT_FIELDS = ("slot_key", "slot_offset", "slot_threshold")


@dataclass
class Router:
    keys: torch.Tensor  # [A, d] unit keys (route_key=prompt) or subject-token slots (subject)
    key_expert: torch.Tensor  # [A] the expert of each key / slot
    slot_key: torch.Tensor  # [A] route_key=subject: the key a slot belongs to
    slot_offset: torch.Tensor  # [A] its offset from the key's last token
    slot_threshold: torch.Tensor  # [A] the key's threshold
    next_key: int = 0  # the id the next subject key gets
    buffer: RowBuffer | None = field(default=None, repr=False, compare=False)  # room to append into
    index_min_slots: int | None = None  # subject keys: candidate keys from an HNSW index over the
    #   slots once there are this many (None: always score every key)
    index_neighbours: int = 32
    index: SlotIndex | None = field(default=None, repr=False, compare=False)  # built lazily

    @classmethod
    def empty(cls, d: int, device: torch.device) -> Router:
        long = torch.zeros(0, dtype=torch.long, device=device)
        return cls(torch.zeros(0, d, device=device), long, long.clone(), long.clone(), torch.zeros(0, device=device))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    # -- changes ---------------------------------------------------------------------------------
    def _append(self, new: dict[str, torch.Tensor]) -> None:
        views, self.buffer = append_rows({k: getattr(self, k) for k in new}, new, self.buffer)
        for k, v in views.items():
            setattr(self, k, v)

    def add_prompt_keys(self, keys: torch.Tensor, expert: int) -> None:
        self._append({"keys": keys, "key_expert": torch.full((keys.shape[0],), expert, dtype=torch.long)})

    def add_subject_keys(self, spans: list[torch.Tensor], expert: int, calibration: TokenBatch, margin: float) -> None:
        """Append one key per subject span (all routed to ``expert``), each with the threshold the
        calibration text sets for it."""
        vecs, key, offset = router.span_slots(spans, self.next_key)
        qc, vc = calibration
        cal, _ = router.span_scores(qc, vc, vecs, key, offset)
        threshold = router.span_thresholds(cal, margin)[key - self.next_key]
        new = {"keys": vecs, "key_expert": torch.full_like(key, expert), "slot_key": key, "slot_offset": offset}
        self._append({**new, "slot_threshold": threshold})
        self.next_key += len(spans)

    def remove_expert(self, p: int) -> None:
        """Drop expert ``p``'s keys; later experts move down by one."""
        self.index = None  # rebuilt on the next routing call
        keep = self.key_expert != p
        self.keys = self.keys[keep]
        if self.slot_key.numel():
            self.slot_key = self.slot_key[keep]
            self.slot_offset = self.slot_offset[keep]
            self.slot_threshold = self.slot_threshold[keep]
        ke = self.key_expert[keep]
        self.key_expert = torch.where(ke > p, ke - 1, ke)

    # -- candidates ------------------------------------------------------------------------------
    def _slot_index(self) -> SlotIndex | None:
        """The slot index, brought up to date with appended slots; None below the size limit."""
        if self.index_min_slots is None or self.size < self.index_min_slots:
            return None
        if self.index is None or self.index.size > self.size:
            self.index = SlotIndex(self.keys.shape[1], self.index_neighbours)
        self.index.add(self.keys[self.index.size :])
        return self.index

    def keep_index_of(self, previous: Router) -> None:
        """Take over ``previous``'s slot index when this table holds the same slots plus appended
        ones (a loaded state that only grew), so the index grows instead of being rebuilt."""
        index = previous.index
        if index is None or self.size < index.size:
            return
        n = index.size
        same = self.keys.data_ptr() == previous.keys.data_ptr() or torch.equal(
            self.keys[:n], previous.keys[:n].to(self.keys)
        )
        self.index = index if same else None

    def _candidates(self, q: torch.Tensor, valid: torch.Tensor) -> Router:
        """This table restricted to the keys the index says may pass their threshold for the
        tokens ``q[valid]`` (all of it when no index applies)."""
        index = self._slot_index()
        if index is None:
            return self
        sel = index.candidate_slots(q[valid], self.slot_key, self.slot_threshold)
        return Router(*(t[sel] for t in (self.keys, self.key_expert, *(getattr(self, f) for f in SLOT_FIELDS))))

    # -- decisions -------------------------------------------------------------------------------
    def route_queries(self, q: torch.Tensor, threshold: float | None) -> torch.Tensor:
        """Top-1 expert of each query vector ``[..., d]`` (``NULL`` below ``threshold``)."""
        choice, _ = router.route(q, self.keys, self.key_expert, threshold)
        return choice

    def route_spans(self, q: torch.Tensor, valid: torch.Tensor, null_route: bool) -> torch.Tensor:
        """route_key=subject, one decision per sequence: the best-matching key anywhere in it."""
        table = self._candidates(q, valid) if null_route else self
        scores, keys = router.span_scores(q, valid, table.keys, table.slot_key, table.slot_offset)
        expert = router.per_key(table.key_expert, table.slot_key, keys)
        threshold = router.per_key(table.slot_threshold, table.slot_key, keys) if null_route else None
        return router.route_spans(scores, threshold, expert)

    def route_clauses(
        self,
        q: torch.Tensor,
        valid: torch.Tensor,
        ids: torch.Tensor,
        classes: segments.TokenClasses,
        *,
        null_route: bool,
        min_tokens: int,
        positions: str,
    ) -> torch.Tensor:
        """gate=clause: the expert of every position (``[B, T]``, ``NULL`` for none).

        With ``positions=subject`` only the matched subject's tokens in the question's clause get
        the expert; with ``run`` every position of the question's clauses does."""
        if null_route:
            table = self._candidates(q, valid)
            if table is not self:
                if table.size == 0:
                    return torch.full(ids.shape, router.NULL, dtype=torch.long, device=q.device)
                return table.route_clauses(
                    q, valid, ids, classes, null_route=True, min_tokens=min_tokens, positions=positions
                )
        seg, content = segments.clause_segments(ids, valid, classes)
        n_seg = int(seg.max()) + 1 if seg.numel() else 1
        scores, keys = router.span_window_scores(q, valid, self.keys, self.slot_key, self.slot_offset)
        per_clause = segments.clause_scores(scores, seg, n_seg)  # [B, S, K]
        expert = router.per_key(self.key_expert, self.slot_key, keys)
        threshold = router.per_key(self.slot_threshold, self.slot_key, keys) if null_route else None
        ok = per_clause >= threshold if threshold is not None else torch.isfinite(per_clause)
        masked = per_clause.masked_fill(~ok, float("-inf"))
        best = keys.numel() - 1 - masked.flip(-1).argmax(-1)  # [B, S]; ties go to the newest key
        choice = torch.where(ok.any(-1), expert.to(best.device)[best], torch.full_like(best, router.NULL))
        counts = segments.clause_content_counts(seg, content, n_seg)
        gate, opening = segments.gate_by_clause(choice, counts, seg[:, -1], min_tokens)
        tokens = gate.gather(1, seg)
        if positions == "run":
            return tokens
        key = best.gather(1, opening.clamp(min=0)[:, None])  # [B, 1] the matched key
        window = scores.gather(2, key[:, :, None].expand(-1, scores.shape[1], 1)).squeeze(-1)
        end = window.masked_fill(seg != opening[:, None], float("-inf")).argmax(1, keepdim=True)
        length = torch.zeros(keys.numel(), dtype=torch.long, device=q.device)
        length = length.index_add_(0, torch.searchsorted(keys, self.slot_key), torch.ones_like(self.slot_key))
        start = end - length[key] + 1
        pos = torch.arange(tokens.shape[1], device=q.device)[None, :]
        on = (pos >= start) & (pos <= end) & (opening[:, None] >= 0)
        return torch.where(on, tokens, torch.full_like(tokens, router.NULL))

    # -- persistence -----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "router.keys": self.keys,
            "router.key_expert": self.key_expert,
            **{f"router.{f}": getattr(self, f) for f in SLOT_FIELDS},
        }

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], meta: dict[str, Any], *, subject: bool, d: int, n_experts: int
    ) -> Router:
        """A router from saved tensors, or :class:`StateError` when they do not fit together."""
        keys, key_expert = state["router.keys"], state["router.key_expert"]
        ok = (
            keys.dim() == 2
            and keys.shape[1] == d
            and key_expert.shape == (keys.shape[0],)
            and (key_expert.numel() == 0 or (int(key_expert.min()) >= 0 and int(key_expert.max()) < max(n_experts, 1)))
        )
        slots = {f: state.get(f"router.{f}") for f in SLOT_FIELDS}
        if subject:
            ok = ok and all(v is not None and v.shape == (keys.shape[0],) for v in slots.values())
        ok = ok and meta.get("route_key", "prompt") == ("subject" if subject else "prompt")
        if not ok:
            raise StateError("LEMoE state does not match this config/model (router keys inconsistent)")
        dev = keys.device
        table = cls.empty(d, dev)
        table.keys, table.key_expert = keys.to(torch.float32), key_expert.to(torch.long)
        if subject:
            table.slot_key = slots["slot_key"].to(torch.long)  # type: ignore[union-attr]
            table.slot_offset = slots["slot_offset"].to(torch.long)  # type: ignore[union-attr]
            table.slot_threshold = slots["slot_threshold"].to(torch.float32)  # type: ignore[union-attr]
            default_next = int(table.slot_key.max()) + 1 if table.slot_key.numel() else 0
            table.next_key = int(meta.get("next_key", default_next))
        return table

    def to(self, device: torch.device) -> Router:
        """This table on ``device`` (keys float32, indices long)."""
        return Router(
            self.keys.to(device, torch.float32),
            self.key_expert.to(device, torch.long),
            self.slot_key.to(device, torch.long),
            self.slot_offset.to(device, torch.long),
            self.slot_threshold.to(device, torch.float32),
            self.next_key,
        )
