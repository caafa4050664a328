"""Where a compiled step's memory traffic goes, and where two steps differ.

For each top-level instruction of the HLO text (the entry computation and the bodies of
its while loops; not the instructions inside fusions), the bytes of its operands and of
its output, summed by where it runs (entry / loop body) and by shape. With two files, the
shapes whose bytes differ most. An approximation of what the compiler's cost analysis
counts as bytes accessed (it reads whole operands, and a loop body counts once), good for
finding what one step moves that the other does not (docs/PERFORMANCE.md, "The same step
compiled by MaxText").

  # ours: the planner writes the compiled step's HLO (PlanConfig.hlo_output)
  HLO=1 FUSED=False IMPLS=auto bash bench/tpu_aot.sh
  # MaxText's: bench/maxtext_aot.sh writes <name>.hlo
  bash bench/maxtext_aot.sh
  .venv/bin/python bench/hlo_bytes.py /tmp/tpu_aot/llama3_8b_v5p8_auto_32l_1r_unfused.hlo \\
      /tmp/maxtext_aot/llama3_8b_v5p8_maxtext_flash_32l_1r.hlo
"""

from __future__ import annotations

import argparse
import collections
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_NOT_WORK = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while",
             "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
             "copy-start", "copy-done"}


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _SHAPE.findall(text)]


def _size(shape: tuple[str, tuple[int, ...]]) -> int:
    n = _BYTES[shape[0]]
    for d in shape[1]:
        n *= d
    return n


def nbytes(text: str) -> int:
    return sum(_size(shape) for shape in shapes(text))


def computations(hlo: str) -> dict[str, list[str]]:
    """{computation name ("ENTRY" for the entry): its instruction lines}."""
    out, current = {}, None
    for line in hlo.split("\n"):
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", line)
        if header:
            current = out.setdefault("ENTRY" if header.group(1) else header.group(2), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return out


def instructions(hlo: str) -> list[dict]:
    """Each top-level instruction: where (entry / loop), op, name, output text, bytes."""
    comps = computations(hlo)
    loops = {m.group(1) for lines in comps.values() for line in lines
             for m in re.finditer(r"\bbody=%?([\w.\-]+)", line)}
    rows = []
    for comp in ["ENTRY", *sorted(loops & set(comps))]:
        for line in comps[comp]:
            m = re.match(r"(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", line)
            if not m or m.group(3) in _NOT_WORK:
                continue
            rest, depth, i = m.group(4), 1, 0
            while i < len(rest) and depth:  # the operand list: up to its closing paren
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            rows.append({"where": "entry" if comp == "ENTRY" else "loop", "op": m.group(3),
                         "name": m.group(1), "output": m.group(2),
                         "bytes": nbytes(m.group(2)) + nbytes(rest[:i - 1])})
    return rows


def by_shape(rows: list[dict]) -> collections.Counter:
    """Bytes by (entry/loop, the output's largest array as dtype and sorted dims): layouts,
    transposes and a fusion's extra scalar outputs apart, the same array in two stacks
    gets the same key."""
    out = collections.Counter()
    for r in rows:
        largest = max(shapes(r["output"]), key=_size, default=("", ()))
        out[(r["where"], largest[0], tuple(sorted(largest[1])))] += r["bytes"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hlo", nargs="+", help="one or two HLO text files")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    tables = []
    for path in args.hlo[:2]:
        rows = instructions(open(path).read())
        totals = collections.Counter()
        for r in rows:
            totals[r["where"]] += r["bytes"]
        print(f"{path}: entry {totals['entry']:.3e} bytes, loop bodies {totals['loop']:.3e}"
              f" ({len(rows)} instructions)")
        tables.append((rows, by_shape(rows)))
    if len(tables) == 1:
        for r in sorted(tables[0][0], key=lambda r: -r["bytes"])[:args.top]:
            print(f"  {r['bytes']:.3e}  {r['where']:<5} {r['op']:<14} {r['output'][:70]}")
        return
    (_, a), (_, b) = tables
    print("largest differences (first - second), by where and output shape:")
    for key in sorted(set(a) | set(b), key=lambda k: -abs(a[k] - b[k]))[:args.top]:
        print(f"  {a[key] - b[key]:+.3e}  {key[0]:<5} {key[1]}{list(key[2])}")


if __name__ == "__main__":
    main()
