"""A replay of past winners (`training.replay`): what the loop trained on in the last N iterations, trained
on again beside each new iteration's samples, as expert iteration keeps a growing set of past winners
rather than one round's.

What is kept is exactly what the backend trained on (the latents and prompt encodings of the diffusion
backend, the token ids of the text backend, and the objective's weights), never the images; an entry
`age` iterations old weighs `training.replay_decay ** age` (1: as much as a new one). The buffer is saved
in every checkpoint (`replay.safetensors`, and its lists in state.json), so a resumed run trains on the
very same samples as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from .protocols import Samples


class Replay:
    def __init__(self, iterations: int, decay: float = 1.0):
        self.iterations, self.decay = iterations, decay
        self.entries: list[tuple[int, Samples]] = []  # (iteration, what it trained on), oldest first

    def __len__(self) -> int:
        return sum(len(s) for _, s in self.entries)

    def mix(self, new: Samples, it: int) -> Samples:
        """`new` (iteration `it`'s training samples) followed by the kept ones, newest first, weighted by age."""
        if not self.entries:
            return new
        parts = [(0, new)] + [(it - at, kept) for at, kept in reversed(self.entries)]
        weighted = self.decay != 1.0 or "weight" in new.payload or any("weight" in s.payload for _, s in self.entries)
        devices = {k: v.device for k, v in new.payload.items() if isinstance(v, torch.Tensor)}
        payloads = []
        for age, part in parts:
            payload = {k: v.to(devices[k]) if isinstance(v, torch.Tensor) and k in devices else v
                       for k, v in part.payload.items()}
            if weighted:
                base = payload.get("weight", torch.ones(len(part), dtype=torch.float64))
                payload["weight"] = base.to(torch.float64).cpu() * (self.decay ** age)
            payloads.append(payload)
        keys = set().union(*(p.keys() for p in payloads))
        if any(set(p) != keys for p, (_, part) in zip(payloads, parts) if len(part)):
            raise RuntimeError(f"replayed samples of another kind: {sorted(keys)}")
        joined: dict[str, Any] = {}
        for key in keys:
            values = [p[key] for p, (_, part) in zip(payloads, parts) if len(part)]
            joined[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]
        return Samples(prompts=[p for _, s in parts for p in s.prompts], seeds=[x for _, s in parts for x in s.seeds],
                       outputs=None, payload=joined)

    def push(self, new: Samples, it: int) -> None:
        """Keep iteration `it`'s training samples (not their images); forget what is N iterations old."""
        if len(new):
            self.entries.append((it, Samples(list(new.prompts), list(new.seeds), None, dict(new.payload))))
        self.entries = [(at, s) for at, s in self.entries if it - at < self.iterations]

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(what state.json records: iterations, prompts, seeds, list payloads; the tensors, by entry)."""
        meta, tensors = [], {}
        for n, (at, s) in enumerate(self.entries):
            lists = {}
            for key, value in s.payload.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{n}/{key}"] = value.detach().cpu().contiguous()
                else:
                    lists[key] = value
            meta.append({"iteration": at, "prompts": s.prompts, "seeds": s.seeds, "lists": lists})
        return {"entries": meta}, tensors

    def load(self, meta: Any, tensors: dict[str, torch.Tensor]) -> None:
        """The buffer `state` wrote; ValueError if the two do not fit together."""
        if not isinstance(meta, dict) or not isinstance(meta.get("entries"), list):
            raise ValueError("state.json's replay holds no entries")
        entries = []
        for n, entry in enumerate(meta["entries"]):
            if not (isinstance(entry, dict) and isinstance(entry.get("iteration"), int)
                    and isinstance(entry.get("prompts"), list) and isinstance(entry.get("seeds"), list)
                    and isinstance(entry.get("lists", {}), dict)):
                raise ValueError(f"replay entry {n} is not an iteration's samples")
            payload: dict[str, Any] = {k[len(f"{n}/"):]: v for k, v in tensors.items() if k.startswith(f"{n}/")}
            payload.update(entry.get("lists", {}))
            size = len(entry["prompts"])
            if len(entry["seeds"]) != size or any(len(v) != size for v in payload.values()):
                raise ValueError(f"replay entry {n} holds {size} prompts but payloads of other lengths")
            entries.append((entry["iteration"], Samples(entry["prompts"], entry["seeds"], None, payload)))
        known = {f"{n}/" for n in range(len(entries))}
        stray = [k for k in tensors if k.split("/", 1)[0] + "/" not in known]
        if stray:
            raise ValueError(f"replay.safetensors holds {stray[0]!r}, of no entry")
        self.entries = entries
