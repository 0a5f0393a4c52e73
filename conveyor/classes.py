"""Class names shared by the generator, the datasets and every task head. Indices are part of the contract.

- ``ITEM_NAMES[c]``: detection / instance class ``c`` (0..9), the Fashion-MNIST label order.
- ``SEMANTIC_NAMES[v]``: semantic map value ``v``; 0 is background, an item of class ``c`` paints ``c + 1``.
- ``FRAME_LABELS[k]``: frame classification label ``k``; 0 is ``empty``, an item of class ``c`` gives ``c + 1``.
- ``STATION``: the inspection station, the band of columns ``[STATION[0] * W, STATION[1] * W)`` of the model
  input (the central quarter). The frame label names what is *at the station*: among the items in the detection
  truth, those whose visible-pixel centroid lies in the band; of these the one with most visible pixels inside
  the band (ties: the front-most); none gives ``empty``. The classification head looks at the same band of the
  shared body's features (``codec.teachers``), so the label is computable from what the head sees.
"""
from __future__ import annotations

ITEM_NAMES: list[str] = [
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]
SEMANTIC_NAMES: list[str] = ["background"] + ITEM_NAMES
FRAME_LABELS: list[str] = ["empty"] + ITEM_NAMES
NUM_ITEMS = len(ITEM_NAMES)
STATION: tuple[float, float] = (0.375, 0.625)  # fraction of the input width, at stride 32: columns 3-4 of 8

