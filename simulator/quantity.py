"""Kubernetes resource quantities ("4Gi", "500M", "1.5Gi", "100m") to numbers.

The simulator keeps its own parser because it must not import the orchestrator (it speaks raw JSON, so a
parsing mistake on either side shows up as a disagreement instead of being shared).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def parse_quantity(value: str | int | float | None) -> Decimal:
    if value is None:
        return Decimal(0)
    if isinstance(value, int | float):
        return Decimal(str(value))
    text = value.strip()
    for suffix in ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "K", "M", "G", "T", "P", "E"):
        if text.endswith(suffix):
            number, mult = text[: -len(suffix)], Decimal(_SUFFIXES[suffix])
            break
    else:
        number, mult = text, Decimal(1)
    try:
        return Decimal(number) * mult
    except InvalidOperation as exc:
        raise ValueError(f"invalid quantity {value!r}") from exc


def to_bytes(value: str | int | float | None) -> int:
    return int(parse_quantity(value).to_integral_value(rounding="ROUND_CEILING"))
