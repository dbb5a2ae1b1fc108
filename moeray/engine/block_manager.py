"""Fixed-size blocks of the latent cache, with prefix caching.

Contract (no torch; the runner owns the tensors, this owns the block ids):
- `allocate_prefix(seq)` gives a waiting sequence the cached blocks that already hold its
  leading full blocks (matched by a chain hash of their token ids) and sets
  `num_computed_tokens` past them. At least one token is always left to compute, because the
  step that computes the last token produces the logits to sample from.
- `ensure_capacity(seq, num_tokens)` appends free blocks until the block table covers
  `num_tokens`; it returns False (allocating nothing) when there are not enough.
- `commit(seq)` registers the content hash of every block the sequence has filled, so later
  requests with the same prefix can share it.
- `free(seq)` drops the sequence's references. A block whose count reaches zero stays cached
  (still findable by hash) until an allocation needs it; then the least recently used such
  block is evicted first.
- `fork(parent, child)` shares the parent's full blocks with the child and gives the child a
  private copy of the partial last block; it returns the (source, destination) block pair the
  runner must copy.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from moeray.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    content_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to rule out hash collisions


@dataclass
class CacheUsage:
    num_blocks: int
    used_blocks: int  # referenced by at least one sequence
    cached_free_blocks: int  # unreferenced but still holding a reusable prefix
    prefix_hits: int  # tokens served from the prefix cache since start
    prefix_queries: int  # prompt tokens looked up since start

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def chain_hash(parent_hash: int | str | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block given everything before it: the parent block's hash, or for the
    first block the sequence's adapter name (None for the base model), since the same tokens
    under another adapter have another latent."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; oldest first
        self._by_hash: dict[int, int] = {}
        self._prefix_hits = 0
        self._prefix_queries = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._evictable)

    def usage(self) -> CacheUsage:
        return CacheUsage(self.num_blocks, self.num_blocks - self.num_free_blocks, len(self._evictable),
                          self._prefix_hits, self._prefix_queries)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------
    def _take_free_block(self) -> Block:
        if self._free_uncached:
            block = self.blocks[self._free_uncached.popleft()]
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently used
            block = self.blocks[block_id]
            del self._by_hash[block.content_hash]
            block.content_hash = block.token_ids = None
        block.ref_count = 1
        return block

    def _acquire(self, block: Block) -> None:
        if block.ref_count == 0:
            self._evictable.pop(block.block_id, None)
        block.ref_count += 1

    def allocate_prefix(self, seq: Sequence) -> None:
        assert not seq.block_table, "allocate_prefix is for sequences that hold no blocks"
        seq.block_hashes = []
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return
        # Leave at least one token to compute: its logits are what the next step samples from.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._prefix_queries += seq.num_tokens
        parent = seq.adapter
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            content_hash = chain_hash(parent, tokens)
            block_id = self._by_hash.get(content_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._acquire(self.blocks[block_id])
            seq.block_table.append(block_id)
            seq.block_hashes.append(content_hash)
            parent = content_hash
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        self._prefix_hits += seq.num_cached_tokens

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register hashes of the blocks `seq` has completely computed since the last commit."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.adapter
            content_hash = chain_hash(parent, tokens)
            seq.block_hashes.append(content_hash)
            block = self.blocks[seq.block_table[i]]
            if block.content_hash is None and content_hash not in self._by_hash:
                block.content_hash, block.token_ids = content_hash, tokens
                self._by_hash[content_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        # Release the tail first, so the LRU order evicts a prompt's tail before its head
        # (a later request is more likely to share the head).
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.content_hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free_uncached.append(block_id)
        seq.block_table = []
        seq.block_hashes = []

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share parent's blocks with child; copy-on-fork for a partially filled last block."""
        full = parent.num_computed_tokens // self.block_size
        for block_id in parent.block_table[:full]:
            self._acquire(self.blocks[block_id])
        child.block_table = list(parent.block_table[:full])
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_computed_tokens = parent.num_computed_tokens
        if parent.num_computed_tokens % self.block_size == 0:
            return None
        # The caller checked capacity; the copy keeps the two sequences from writing into each
        # other's partial block.
        dst = self._take_free_block()
        child.block_table.append(dst.block_id)
        return parent.block_table[full], dst.block_id
