"""RFC 6962 Merkle trees over a run's event hashes: the root goes into the signed checkpoint, and an
inclusion proof shows one event belongs to the run without handing over the other events."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def leaf_hash(event_hash: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(event_hash)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleAccumulator:
    """The root of a growing tree in O(log n) memory: perfect subtrees on a stack, folded from the right
    (which is exactly RFC 6962's split at the largest power of two)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (leaf count, hash), sizes strictly decreasing

    def add(self, event_hash: str) -> None:
        self.add_digests([bytes.fromhex(event_hash)])

    def add_digests(self, digests: list[bytes]) -> None:
        """Add event hashes given as raw 32-byte digests (the writer's fast path)."""
        stack, sha256 = self._stack, hashlib.sha256
        for digest in digests:
            node, count = sha256(b"\x00" + digest).digest(), 1
            while stack and stack[-1][0] == count:
                node, count = sha256(b"\x01" + stack.pop()[1] + node).digest(), count * 2
            stack.append((count, node))
        self.size += len(digests)

    def root(self) -> str:
        if not self._stack:
            return hashlib.sha256(b"").hexdigest()
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node.hex()


def merkle_root(event_hashes: Iterable[str]) -> str:
    accumulator = MerkleAccumulator()
    for h in event_hashes:
        accumulator.add(h)
    return accumulator.root()


def inclusion_proof(event_hashes: list[str], index: int) -> list[str]:
    """Audit path for leaf `index` (RFC 6962 section 2.1.1), as hex sibling hashes bottom-up."""
    leaves = [leaf_hash(h) for h in event_hashes]

    def path(lo: int, hi: int, i: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = 1 << ((n - 1).bit_length() - 1)  # largest power of two below n
        if i < k:
            return [*path(lo, lo + k, i), _subtree(leaves, lo + k, hi)]
        return [*path(lo + k, hi, i - k), _subtree(leaves, lo, lo + k)]

    if not 0 <= index < len(leaves):
        raise IndexError(index)
    return [h.hex() for h in path(0, len(leaves), index)]


def _subtree(leaves: list[bytes], lo: int, hi: int) -> bytes:
    if hi - lo == 1:
        return leaves[lo]
    k = 1 << ((hi - lo - 1).bit_length() - 1)
    return node_hash(_subtree(leaves, lo, lo + k), _subtree(leaves, lo + k, hi))


def verify_inclusion(event_hash: str, index: int, size: int, proof: list[str], root: str) -> bool:
    """RFC 9162 section 2.1.3.2: recompute the root from one leaf and its audit path."""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    node = leaf_hash(event_hash)
    for sibling_hex in proof:
        sibling = bytes.fromhex(sibling_hex)
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            node = node_hash(sibling, node)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            node = node_hash(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and node.hex() == root
