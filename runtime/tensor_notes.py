"""Values attached to a tensor by identity, for as long as the tensor lives.

``TensorNotes`` maps a tensor (not its values: ``id`` plus a weak reference that checks it is
still the same object) to a note, and forgets the note when the tensor is freed. Used for what
a kernel computed alongside a result and a later step needs: the gather attention's log-sum-exp
for the backward of ``sparse.attend`` (``runtime.providers``), quest's page summaries of a
cache's keys (``runtime.page_summaries``).
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch


class TensorNotes:
    def __init__(self):
        self._notes: dict = {}

    def put(self, t: torch.Tensor, note: Any) -> None:
        key, notes = id(t), self._notes
        notes[key] = (weakref.ref(t, lambda _, key=key: notes.pop(key, None)), note)

    def get(self, t: torch.Tensor) -> Optional[Any]:
        ent = self._notes.get(id(t))
        return ent[1] if ent is not None and ent[0]() is t else None

    def pop(self, t: torch.Tensor) -> Optional[Any]:
        note = self.get(t)
        if note is not None:
            del self._notes[id(t)]
        return note

    def __len__(self) -> int:
        return len(self._notes)
