"""Class names shared by the generator, the datasets and every task head. Indices are part of the contract.

- ``ITEM_NAMES[c]``: detection / instance class ``c`` (0..9), the Fashion-MNIST label order.
- ``SEMANTIC_NAMES[v]``: semantic map value ``v``; 0 is background, an item of class ``c`` paints ``c + 1``.
- ``FRAME_LABELS[k]``: frame classification label ``k``; 0 is ``empty``, an item of class ``c`` gives ``c + 1``.
"""
from __future__ import annotations

ITEM_NAMES: list[str] = [
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
SEMANTIC_NAMES: list[str] = ["background"] + ITEM_NAMES
FRAME_LABELS: list[str] = ["empty"] + ITEM_NAMES
NUM_ITEMS = len(ITEM_NAMES)
