"""In-memory stand-ins for pipelines.loader's TrainLoader / ValLoader (same batch dicts, same
state_dict protocol), so engine tests run without DALI. Mixing uses mixpro_dali's own kernels."""
from __future__ import annotations

import torch

from mixpro_dali.config import MixConfig
from mixpro_dali.masks import apply_mix, sample_mix


class FakeTrainLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mix: MixConfig, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
                 mean=0.5, std=0.5):
        self.images, self.labels = images, labels  # (N, 3, H, W) float in [0, 1], (N,) int64
        self.batch_size, self.mix, self.seed = batch_size, mix, seed
        self.shard_id, self.num_shards = shard_id, num_shards
        self.mean, self.std = mean, std
        self.epoch, self.pos, self.consumed = 0, 0, 0

    def __len__(self) -> int:
        return (len(self.labels) // self.num_shards) // self.batch_size

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        return order[self.shard_id::self.num_shards]

    def __iter__(self):
        order = self._order()
        while self.pos < len(self):
            idx = order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
            x, y = self.images[idx], self.labels[idx]
            p = sample_mix(self.mix, len(idx), self.consumed, self.shard_id)
            x = apply_mix(x, p, patch_size=self.mix.patch_size, layout="CHW")
            self.pos += 1
            self.consumed += 1
            yield {"image": (x - self.mean) / self.std, "label_a": y.clone(),
                   "label_b": y[p.partner].clone(), "lam": p.lam.clone(),
                   "token_mask": p.token_mask.clone(),
                   "mode": torch.full((len(idx),), p.mode, dtype=torch.int32)}
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "consumed": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos, self.consumed = sd["epoch"], sd["pos"], sd["consumed"]


class FakeValLoader:
    def __init__(self, images, labels, *, batch_size: int, shard_id: int = 0, num_shards: int = 1,
                 mean=0.5, std=0.5):
        self.images, self.labels = images[shard_id::num_shards], labels[shard_id::num_shards]
        self.batch_size, self.mean, self.std = batch_size, mean, std

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            yield {"image": (self.images[i:i + self.batch_size] - self.mean) / self.std,
                   "label": self.labels[i:i + self.batch_size]}
