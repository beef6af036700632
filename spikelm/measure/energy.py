"""Per-operation energy tables for the synaptic-operation energy estimate (see docs/design.md, "Sparsity and energy").

A dense layer performs one multiply-accumulate (MAC) per input element per output; a spiking layer performs one
accumulate (AC) per spike per output, because a spike of count 1 only adds a weight. The estimate is
``MACs x E_MAC + ACs x E_AC``, with per-operation energies from a published table.

Source of the presets: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
45 nm at 0.9 V. The paper lists adds and multiplies separately; a MAC here is one multiply plus one add:

=========  ========  ========  =====================  ===========
format     add (pJ)  mult (pJ) MAC = mult + add (pJ)  AC = add (pJ)
=========  ========  ========  =====================  ===========
fp32       0.9       3.7       4.6                    0.9
fp16       0.4       1.1       1.5                    0.4
int8       0.03      0.2       0.23                   0.03
=========  ========  ========  =====================  ===========

Memory access (which dominates real chips: a 32-bit SRAM read of an 8 KB array is 5 pJ, DRAM ~640 pJ) is not part
of these tables; the estimate is the arithmetic energy only, as in the spiking-LM literature that quotes it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

HOROWITZ_2014 = "M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, 45 nm, 0.9 V"


@dataclass(frozen=True)
class EnergyTable:
    """Energy of one arithmetic operation, in picojoules.

    Attributes:
        name: how the table is selected (``"45nm-fp32"``) or ``"custom"``.
        mac_pj: one multiply-accumulate (what a dense projection pays per input element per output).
        ac_pj: one accumulate (what a spiking projection pays per spike per output).
        source: where the numbers come from.
    """

    name: str
    mac_pj: float
    ac_pj: float
    source: str

    def __post_init__(self) -> None:
        for field in ("mac_pj", "ac_pj"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"EnergyTable.{field}={value!r} must be a positive number of picojoules")

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)

    def describe(self) -> str:
        """One line for printing next to a result: the numbers used and where they come from."""
        return f"energy table {self.name}: MAC {self.mac_pj:g} pJ, AC {self.ac_pj:g} pJ ({self.source})"


ENERGY_TABLES: dict[str, EnergyTable] = {
    "45nm-fp32": EnergyTable("45nm-fp32", mac_pj=4.6, ac_pj=0.9, source=HOROWITZ_2014 + ", fp32 mult 3.7 + add 0.9"),
    "45nm-fp16": EnergyTable("45nm-fp16", mac_pj=1.5, ac_pj=0.4, source=HOROWITZ_2014 + ", fp16 mult 1.1 + add 0.4"),
    "45nm-int8": EnergyTable("45nm-int8", mac_pj=0.23, ac_pj=0.03, source=HOROWITZ_2014 + ", int8 mult 0.2 + add 0.03"),
}
DEFAULT_ENERGY_TABLE = "45nm-fp32"

_CUSTOM = re.compile(r"^\s*mac\s*=\s*([0-9.eE+-]+)\s*,\s*ac\s*=\s*([0-9.eE+-]+)\s*$")


def get_energy_table(energy: str | EnergyTable = DEFAULT_ENERGY_TABLE) -> EnergyTable:
    """Resolve a table by name (``45nm-fp32``, ``45nm-fp16``, ``45nm-int8``), a ``"mac=4.6,ac=0.9"`` string of
    picojoules for your own hardware, or pass an ``EnergyTable`` through unchanged."""
    if isinstance(energy, EnergyTable):
        return energy
    if not isinstance(energy, str):
        raise ValueError(f"energy={energy!r} must be a table name or an EnergyTable")
    if energy in ENERGY_TABLES:
        return ENERGY_TABLES[energy]
    match = _CUSTOM.match(energy)
    if match:
        try:
            mac, ac = float(match.group(1)), float(match.group(2))
        except ValueError:
            match = None
        else:
            return EnergyTable("custom", mac_pj=mac, ac_pj=ac, source="user-supplied")
    raise ValueError(
        f"energy={energy!r} is not a known energy table; choose one of {', '.join(ENERGY_TABLES)} "
        "or give your own per-operation energies as 'mac=<pJ>,ac=<pJ>'"
    )


def format_energy(picojoules: float) -> str:
    """A readable energy with a unit that keeps 3 significant digits: ``1.23 uJ``."""
    for scale, unit in ((1e12, "J"), (1e9, "mJ"), (1e6, "uJ"), (1e3, "nJ")):
        if abs(picojoules) >= scale:
            return f"{picojoules / scale:.3g} {unit}"
    return f"{picojoules:.3g} pJ"


__all__ = ["EnergyTable", "ENERGY_TABLES", "DEFAULT_ENERGY_TABLE", "get_energy_table", "format_energy"]
