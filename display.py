"""Plain-text formatting for the terminal: tables, sizes and a small loss chart."""
from __future__ import annotations


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def rows_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns: label, value."""
    if not rows:
        return ""
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def loss_chart(values: list[float], width: int = 60, height: int = 10) -> str:
    """A text chart of a loss curve; each column is the mean of a slice of steps.

    >>> print(loss_chart([4.0, 3.0, 2.0, 1.0], width=4, height=2))
        4.000 |#
        1.000 |####
              +----
    """
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "  (no steps yet)"
    width = max(1, min(width, len(values)))
    columns = []
    for i in range(width):
        part = values[i * len(values) // width:(i + 1) * len(values) // width] or [values[-1]]
        columns.append(sum(part) / len(part))
    hi, lo = max(columns), min(columns)
    span = (hi - lo) or 1.0
    lines = []
    for row in range(height):
        # The top row marks columns at the maximum, the bottom row every column.
        level = hi - span * row / max(1, height - 1)
        bar = "".join("#" if c >= level - 1e-12 else " " for c in columns)
        label = f"{level:7.3f}" if row in (0, height - 1) else " " * 7
        lines.append(f"  {label} |{bar}".rstrip())
    lines.append("  " + " " * 7 + " +" + "-" * width)
    return "\n".join(lines)
