"""The linear modules of a Falcon layer, as the engine describes them.

The one description lives in C (``csrc/common.c``, the table behind ``ft.h``'s ``FT_MOD_*``) and
reaches Python as ``falcontune._C.MODULES``; every Python module that names a linear, builds a
checkpoint or PEFT key, or sizes a LoRA matrix goes through here instead of restating it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _C

if TYPE_CHECKING:
    from .models import FalconConfig


@dataclass(frozen=True)
class Module:
    """One linear of a Falcon layer."""

    index: int      #: the engine's module index (FT_MOD_*), also its bit in a LoRA target mask
    name: str       #: "query_key_value": the PEFT target name
    parent: str     #: "self_attention" or "mlp"
    in_width: str   #: "hidden", "ffn" or "qkv": which config width in_features is
    out_width: str  #: the same for out_features

    @property
    def path(self) -> str:
        """``self_attention.query_key_value``: the module's path inside ``transformer.h.N``."""
        return f"{self.parent}.{self.name}"


#: every linear of a layer, in the engine's order
MODULES: tuple[Module, ...] = tuple(Module(i, *entry) for i, entry in enumerate(_C.MODULES))
#: their names, in the same order
MODULE_NAMES: tuple[str, ...] = tuple(m.name for m in MODULES)
BY_NAME: dict[str, Module] = {m.name: m for m in MODULES}
#: the fused qkv layouts the engine knows (FalconConfig.qkv_layout values), by engine index
QKV_LAYOUTS: tuple[str, ...] = tuple(_C.QKV_LAYOUTS)


def module(name: str) -> Module:
    """The module called ``name``; ValueError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown module {name!r}; expected one of {', '.join(MODULE_NAMES)}") from None


def _shapes(config: "FalconConfig") -> list[tuple[int, int]]:
    return [(int(i), int(o)) for i, o in
            _C.module_shapes(hidden=config.hidden_size, ffn=config.ffn_hidden_size,
                             n_head=config.num_attention_heads, n_kv_head=config.num_kv_heads,
                             head_dim=config.head_dim, qkv_layout=config.qkv_layout)]


def linear_shapes(config: "FalconConfig") -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) for this config, computed by the engine."""
    return {m.path: s for m, s in zip(MODULES, _shapes(config))}


def widths(config: "FalconConfig") -> dict[str, int]:
    """Width name ("hidden", "ffn", "qkv") -> its value for this config."""
    out: dict[str, int] = {}
    for m, (fin, fout) in zip(MODULES, _shapes(config)):
        out[m.in_width], out[m.out_width] = fin, fout
    return out


def target_mask(names: "tuple[str, ...] | list[str]") -> int:
    """The engine's bit mask of LoRA target modules."""
    return sum(1 << module(n).index for n in set(names))


def linear_prefix(layer: int, name: str) -> str:
    """``transformer.h.<layer>.<parent>.<name>``: the checkpoint prefix of a linear's tensors."""
    return f"transformer.h.{layer}.{module(name).path}"


def lora_key(layer: int, name: str, which: str) -> str:
    """PEFT's name of a LoRA matrix (which: 'A' [r, in] or 'B' [out, r])."""
    return f"base_model.model.{linear_prefix(layer, name)}.lora_{which}.weight"
