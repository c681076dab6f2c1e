"""A quantized embedding table and the LM head tied to it: one quantized tensor, two uses."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QuantizationError
from .linear import QuantLinear


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a :class:`QuantLinear` holding the ``[vocab, dim]`` table: looks up only
    the requested rows and dequantizes those. With a tied LM head, :meth:`as_lm_head` gives a
    module that runs the same quantized table as the output projection (one copy of the weight)."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.table = table
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise QuantizationError(f"embedding ids must be int32/int64, got {ids.dtype}")
        flat = ids.reshape(-1).long()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            raise QuantizationError(f"token id out of range [0, {self.num_embeddings})")
        return self.table.dequantize(self.dtype, rows=flat).view(*ids.shape, self.embedding_dim)

    def as_lm_head(self) -> "TiedQuantHead":
        return TiedQuantHead(self)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.table.mode}"


class TiedQuantHead(nn.Module):
    """LM head tied to a :class:`QuantEmbedding`: holds no tensors of its own (so the state dict and
    memory carry the table once) and calls the embedding's quantized table as a linear layer."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: avoids a duplicate state entry
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding.table(x)
