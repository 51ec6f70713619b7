"""The KV block table: which cache blocks each sequence owns. Pure bookkeeping (no torch, no ray).

A sequence reserves, when it is admitted, every block it can ever need (prompt + max_tokens), so a
running sequence never runs out of cache mid-stream and nothing is ever preempted; a request that
does not fit waits in the queue instead. Blocks go back to the free list when the sequence ends.
"""
from __future__ import annotations


class KVBlockTable:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO: a block freed a moment ago is still warm in the CPU cache
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owned: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by sequences."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def reserve(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give `seq_id` the blocks for `num_tokens` tokens; RuntimeError if they are not free."""
        if seq_id in self._owned:
            raise RuntimeError(f"sequence {seq_id!r} already owns KV blocks")
        n = self.blocks_for(num_tokens)
        if n > len(self._free):
            raise RuntimeError(f"sequence {seq_id!r} needs {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._owned[seq_id] = blocks
        return blocks

    def blocks(self, seq_id: str) -> list[int]:
        return self._owned[seq_id]

    def free(self, seq_id: str) -> int:
        """Return `seq_id`'s blocks to the free list; freeing twice is a no-op. Returns the count."""
        blocks = self._owned.pop(seq_id, [])
        self._free.extend(reversed(blocks))
        return len(blocks)

    def owners(self) -> list[str]:
        return list(self._owned)
