"""Parameter inventories: sizes by owning module, and the aggregates ZeRO-3 memory depends on.

The sizes come from the backbone (``BackboneSpec.memory_inventory``: exact counts of the model built on
the ``meta`` device from its config, no weights, no download).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twinflow.backbones.registry import MemoryInventory, backbone_spec, param_sizes_by_module

__all__ = ["ParamInventory", "backbone_inventory", "param_sizes_by_module"]


@dataclass(frozen=True)
class ParamInventory:
    """Parameter sizes by owning module, with the aggregates ZeRO-3 memory depends on.

    ``block_prefix`` names the repeated blocks (``transformer_blocks.<i>.``): with gradient
    checkpointing, the unit whose parameters stay gathered through its recomputation.
    """

    sizes_by_module: Mapping[str, Sequence[int]]
    block_prefix: str = "transformer_blocks."

    def __post_init__(self) -> None:
        if not self.sizes_by_module:
            raise ValueError("the parameter inventory is empty")
        for name, sizes in self.sizes_by_module.items():
            if not sizes or any(int(s) <= 0 for s in sizes):
                raise ValueError(f"module {name!r}: parameter sizes must be positive, got {list(sizes)}")

    def param_sizes(self) -> list[int]:
        return [int(s) for sizes in self.sizes_by_module.values() for s in sizes]

    @property
    def total(self) -> int:
        return sum(self.param_sizes())

    @property
    def largest_module(self) -> int:
        """DeepSpeed's "largest layer": the most parameters any single module owns directly."""
        return max(sum(sizes) for sizes in self.sizes_by_module.values())

    def _blocks(self) -> dict[str, int]:
        blocks: dict[str, int] = {}
        for name, sizes in self.sizes_by_module.items():
            if name.startswith(self.block_prefix):
                index = name[len(self.block_prefix):].split(".", 1)[0]
                blocks[index] = blocks.get(index, 0) + sum(sizes)
        return blocks

    @property
    def num_blocks(self) -> int:
        return len(self._blocks())

    @property
    def largest_block(self) -> int:
        """Parameters of the largest repeated block (the largest module when there are no blocks)."""
        return max(self._blocks().values(), default=self.largest_module)

    def partition_numel(self, world_size: int) -> int:
        """Elements of one rank's flat partition: every parameter padded to a multiple of N, split N ways."""
        return sum(math.ceil(s / world_size) for s in self.param_sizes())

    def largest_subgroup_partition(self, world_size: int, sub_group_size: int) -> int:
        """Elements of the rank's largest optimizer sub-group, split as DeepSpeed does: parameters are
        appended in order until the sub-group's partition reaches ``sub_group_size``."""
        parts = [math.ceil(s / world_size) for s in self.param_sizes()]
        if sub_group_size >= sum(parts):
            return sum(parts)
        largest = current = 0
        for part in parts:
            current += part
            if current >= sub_group_size:
                largest, current = max(largest, current), 0
        return max(largest, current)

    def persistent_numel(self, threshold: int, model_threshold: int) -> int:
        """Elements ZeRO-3 keeps gathered on every rank: parameters of at most ``threshold`` elements,
        in order, while their total stays within ``model_threshold``."""
        total = 0
        for s in self.param_sizes():
            if s <= threshold and total + s <= model_threshold:
                total += s
        return total


def backbone_inventory(model: Any) -> tuple[ParamInventory, MemoryInventory]:
    """The inventory of the network a ``model`` config section trains, asked of its backbone family."""
    memory = backbone_spec(model).memory_inventory(model)
    return ParamInventory(memory.sizes_by_module, memory.block_prefix), memory
