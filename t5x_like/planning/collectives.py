"""What a compiled step communicates, read from its HLO text, and how long that takes.

`parse(hlo_text, mesh_shape, ici_shape)` lists every all-gather, reduce-scatter,
all-reduce, all-to-all and collective-permute of an XLA executable (`compiled.as_text()`,
after SPMD partitioning) with
- how often it runs per step: its static count times the trip counts of the while loops
  around it (the scan over layers, the scan over microbatches);
- its buffer size S (all-gather: the gathered result; reduce-scatter: the unreduced
  operand; the others: the buffer);
- its replica groups, decoded from any of XLA's three spellings (a list of lists, an
  iota `[G,S]<=[dims]T(perm)`, or mesh axes `mesh['axis_0'=4,...] {'axis_0'}`) and
  mapped onto the named mesh axes they span, and how many nodes one group covers.

`seconds(...)` prices one collective on a cluster's links: the part inside a node at the
per-device intra-node bandwidth (NVLink) and the part across nodes at each device's share
of the node's network, as NCCL's hierarchical algorithms split it (docs/PLANNING.md,
"Communication").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                  "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
# A computation's closing line (not `}}`); the TPU compiler's SparseCore computations
# close with `}, execution_thread="sparsecore"`.
_END = re.compile(r'^\}(,\s*execution_thread="[^"]*")?\s*(//.*)?$')
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|"
                     r"called_computations)=\{?([^}\s]*)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled step.

    buffer_bytes: S, the full buffer the algorithm moves (see the module docstring),
      at the width GPUs and TPUs move it (see `widened`).
    group_size: devices per replica group (2 for a collective-permute pair).
    mesh_axes: the named mesh axes along which a group's devices differ.
    nodes: nodes one group spans (1: all inside a node).
    count: executions per step.
    sliced_after: every consumer keeps only this device's slice (see `priced_as`).
    widened: XLA:CPU widened a 16-bit all-reduce to 32 bits (its reducer is a
      "*_promoted" clone; XLA:CPU reduces bfloat16 in float32): `buffer_bytes` and
      `dtype` are the 16-bit original's, which GPUs and TPUs reduce as is.
    source: the jax operation it came from (the HLO metadata's op_name).
    """

    name: str
    op: str
    dtype: str
    buffer_bytes: int
    group_size: int
    mesh_axes: tuple[str, ...]
    nodes: int
    count: int
    sliced_after: bool = False
    widened: bool = False
    source: str = ""

    @property
    def priced_as(self) -> str:
        """The op whose traffic it costs: an all-reduce whose every consumer keeps only
        this device's slice (all-reduce + dynamic-slice, how XLA:CPU writes a gradient
        reduce-scatter) is priced as the reduce-scatter a GPU compiler makes of it."""
        return "reduce-scatter" if self.sliced_after else self.op

    @property
    def bytes_per_step(self) -> int:
        return self.buffer_bytes * self.count


# ----------------------------------------------------------------------------- parsing


def _open_brackets(text: str, state: tuple[int, bool]) -> tuple[int, bool]:
    """(bracket depth, inside a string) after `text`, from `state`: how an instruction
    whose attributes span several lines is known to go on."""
    depth, quoted = state
    escaped = False
    for char in text:
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "{([":
            depth += 1
        elif char in "})]":
            depth -= 1
    return depth, quoted


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instructions}, and the entry computation's name.

    An instruction is one line unless an attribute spans several: a Pallas kernel's
    custom call (the TPU compiler's tpu_custom_call, a Triton or Mosaic GPU call) can
    carry its kernel's text or a printed config in `backend_config`, whose lines may
    begin with `}` or `}}`. Such an instruction goes on until its brackets and strings
    close; its lines are joined with newlines. A computation ends at a `}` line outside
    any instruction.
    """
    out: dict[str, list[str]] = {}
    entry, current = "", None
    pending, state = "", (0, False)
    for line in text.splitlines():
        if pending:
            pending += "\n" + line
            state = _open_brackets(line, state)
        elif current is None:
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                out[current] = []
                entry = current if header.group(1) else entry
            continue
        elif _END.match(line):
            current = None
            continue
        elif " = " in line:
            pending, state = line, _open_brackets(line, (0, False))
        if pending and state[0] <= 0 and not state[1]:
            out[current].append(pending)
            pending = ""
    if pending:
        raise ValueError(f"The HLO text ends inside an instruction: {pending[:200]!r}...; "
                         "pass the whole compiled.as_text() of a jax executable.")
    if not entry:
        raise ValueError("No ENTRY computation in the HLO text; pass compiled.as_text() "
                         "of a jax executable.")
    return out, entry


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result type, opcode, the rest) of one instruction line."""
    lhs, _, rhs = line.strip().removeprefix("ROOT ").partition(" = ")
    if rhs.startswith("("):  # a tuple type: up to its matching parenthesis
        depth = 0
        for end, char in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                break
        type_str, rest = rhs[:end + 1], rhs[end + 1:].lstrip()
    else:
        type_str, _, rest = rhs.partition(" ")
    match = re.match(r"([a-z][a-z0-9_-]*)\(", rest)
    if not match:
        return None
    return lhs.lstrip("%"), type_str, match.group(1), rest[match.end():]


def _arrays(type_str: str) -> list[tuple[str, int]]:
    """[(dtype, bytes)] of every array in a (possibly tuple) type."""
    out = []
    for dtype, dims in _ARRAY.findall(type_str):
        if dtype in _DTYPE_BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d)
            out.append((dtype, n * _DTYPE_BYTES[dtype]))
    return out


def _trip_count(rest: str, computations: Mapping[str, list[str]]) -> int | None:
    """Iterations of a while loop: XLA's known_trip_count, else the bound N of the
    `i < N` compare in its condition (jax's scan counts from 0 by 1, as do the TPU
    compiler's own loops, e.g. its windowed einsums, with unsigned counters)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([^,\s]+)", rest)
    lines = computations.get(cond.group(1), []) if cond else []
    constants = [int(m.group(1)) for line in lines
                 for m in [re.search(r"[su](?:32|64)\[\]\S* constant\((\d+)\)", line)] if m]
    if len(constants) == 1 and any("direction=LT" in line for line in lines):
        return constants[0]
    return None


def execution_counts(computations: Mapping[str, list[str]], entry: str
                     ) -> dict[str, int | None]:
    """How many times each computation runs per execution of `entry`.

    A while body runs its trip count times per run of the caller; anything else called
    (fusions, calls, branches, reducers) once. None where a loop on the way has a trip
    count that cannot be read.
    """
    callers: dict[str, list[tuple[str, int | None]]] = {}
    for caller, lines in computations.items():
        for line in lines:
            for key, names in _CALLED.findall(line):
                trips = _trip_count(line, computations) if key == "body" else 1
                for callee in re.findall(r"%?([^,%\s]+)", names):
                    callers.setdefault(callee, []).append((caller, trips))
    counts: dict[str, int | None] = {entry: 1}

    def count(name: str) -> int | None:
        if name not in counts:
            total: int | None = 0
            for caller, trips in callers.get(name, []):
                runs = count(caller)
                total = None if None in (total, runs, trips) else total + runs * trips
            counts[name] = total
        return counts[name]

    return {name: count(name) for name in computations}


# ------------------------------------------------------------------------ replica groups


def _iota(reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    array = np.arange(math.prod(reshape)).reshape(reshape)
    return array.transpose(perm) if perm else array


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _balanced(text: str, start: int) -> str:
    """The bracketed text opening at text[start] ('{' or '('), brackets included."""
    opening = text[start]
    closing = {"{": "}", "(": ")"}[opening]
    depth = 0
    for end in range(start, len(text)):
        depth += (text[end] == opening) - (text[end] == closing)
        if depth == 0:
            return text[start:end + 1]
    raise ValueError(f"Unbalanced {opening!r} in HLO attribute {text[start:start + 80]!r}.")


def _mesh_groups(spec: str) -> np.ndarray:
    """Groups of XLA's mesh-axes spelling: mesh['a'=2,'b'=4], device_ids=(...) {'a'}.

    The mesh's device array is iota (or the given ids) in the mesh's shape; each named
    axis, or sub-axis 'a':(pre)size, of the braces is gathered into one group, as
    xla::MeshAxesReplicaGroupList::flattened_replica_groups does.
    """
    head = re.match(r"mesh\[([^\]]*)\]", spec)
    names = re.findall(r"'([^']+)'=\d+", head.group(1))
    sizes = [int(x) for x in re.findall(r"'[^']+'=(\d+)", head.group(1))]
    devices = np.arange(math.prod(sizes))
    ids_at = spec.find("device_ids=(", head.end())
    if ids_at >= 0:
        ids = _balanced(spec, ids_at + len("device_ids="))[1:-1]
        iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", ids)
        devices = (_iota(_ints(iota.group(1)), iota.group(2) and _ints(iota.group(2)))
                   if iota else np.array(_ints(ids)))
    # Only the braces: the attributes after them (metadata's op names) quote names too.
    axes_text = _balanced(spec, spec.index("{", head.end()))
    refs = [(names.index(name), int(pre) if pre else None, int(size) if size else None)
            for name, pre, size in re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", axes_text)]
    reshape: list[int] = []
    grouped: list[int] = []
    for axis, full in enumerate(sizes):
        mine = sorted((r for r in refs if r[0] == axis), key=lambda r: r[1] or 0)
        if not mine or mine[0][1] is None:
            grouped += [len(reshape)] if mine else []
            reshape.append(full)
            continue
        prefix = 1
        for _, pre, size in mine:  # sub-axes: split the axis into (pad, size, ..., rest)
            if pre != prefix:
                reshape.append(pre // prefix)
                prefix = pre
            grouped.append(len(reshape))
            reshape.append(size)
            prefix *= size
        if prefix != full:
            reshape.append(full // prefix)
    kept = [i for i in range(len(reshape)) if i not in grouped]
    group_size = math.prod(reshape[i] for i in grouped)
    return devices.reshape(reshape).transpose(kept + grouped).reshape(-1, group_size)


def replica_groups(attributes: str, num_devices: int) -> np.ndarray:
    """[groups, devices per group] of partition ids, from an instruction's attributes
    (or [pairs, 2] of a collective-permute's source_target_pairs)."""
    pairs = re.search(r"source_target_pairs=", attributes)
    if pairs:
        return np.array(_ints(_balanced(attributes, pairs.end()))).reshape(-1, 2)
    found = re.search(r"replica_groups=", attributes)
    if not found:
        return np.arange(num_devices).reshape(1, -1)
    spec = attributes[found.end():]
    if spec.startswith("mesh["):
        return _mesh_groups(spec)
    iota = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    if iota:
        groups, size = int(iota.group(1)), int(iota.group(2))
        return _iota(_ints(iota.group(3)), iota.group(4) and _ints(iota.group(4))
                     ).reshape(groups, size)
    lists = re.findall(r"\{([\d,]*)\}", _balanced(spec, 0))
    if not lists or lists == [""]:
        return np.arange(num_devices).reshape(1, -1)  # {}: one group of every device
    return np.array([_ints(group) for group in lists])


def _span(groups: np.ndarray, mesh_shape: Mapping[str, int],
          ici_shape: Mapping[str, int]) -> tuple[tuple[str, ...], int]:
    """(mesh axes the groups vary along, most nodes one group covers). A device's node
    is its coordinate divided by the inside-a-node size, axis by axis (the hybrid
    mesh puts the across-node factor of each axis outermost)."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    coords = np.stack(np.unravel_index(groups, sizes), axis=-1)  # [groups, size, axes]
    varying = (coords != coords[:, :1, :]).any(axis=(0, 1))
    nodes_of = coords // np.array([ici_shape[name] for name in names])
    nodes = max(len(np.unique(group, axis=0)) for group in nodes_of)
    return tuple(n for n, v in zip(names, varying) if v), nodes


def _consumers(computations: Mapping[str, list[str]]
               ) -> dict[str, list[tuple[str, str, str | None]]]:
    """{instruction: [(consumer, its opcode, the computation it calls or None)]}."""
    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for lines in computations.values():
        for line in lines:
            parts = _split_instruction(line)
            if parts:
                called = re.search(r"calls=%([^,\s]+)", parts[3])
                for operand in set(re.findall(r"%([\w.-]+)", parts[3])):
                    out.setdefault(operand, []).append(
                        (parts[0], parts[2], called and called.group(1)))
    return out


_PASS_THROUGH = {"get-tuple-element", "bitcast", "copy", "convert", "collective-permute"}


def _opcodes(lines: Sequence[str]) -> set[str]:
    return {parts[2] for parts in map(_split_instruction, lines) if parts}


def _only_sliced(name: str, consumers, computations: Mapping[str, list[str]]) -> bool:
    """Whether every use of `name`, through element reads, casts and copies, is a
    dynamic slice (an op, or a fusion that slices), perhaps after a reshuffle between
    devices (collective-permute): the all-reduce + dynamic-slice spelling of a
    reduce-scatter (XLA:CPU's, and the TPU compiler's in places)."""
    uses = consumers.get(name, [])
    for user, opcode, called in uses:
        inner = _opcodes(computations.get(called, [])) if called else set()
        if opcode in _PASS_THROUGH or (called and inner <= _PASS_THROUGH | {"parameter"}):
            if not _only_sliced(user, consumers, computations):
                return False
        elif opcode != "dynamic-slice" and "dynamic-slice" not in inner:
            return False
    return bool(uses)


def _tuple_elements(computations: Mapping[str, list[str]]) -> dict[tuple[str, int], list[str]]:
    """{(tuple-valued instruction, index): the get-tuple-element instructions reading it}."""
    out: dict[tuple[str, int], list[str]] = {}
    for lines in computations.values():
        for line in lines:
            read = re.search(r"%([\w.-]+) = .*get-tuple-element\(%([\w.-]+)\), index=(\d+)",
                             line)
            if read:
                out.setdefault((read.group(2), int(read.group(3))), []).append(read.group(1))
    return out


@dataclasses.dataclass(frozen=True)
class _Program:
    """What `parse` reads once per HLO module."""

    computations: Mapping[str, list[str]]
    consumers: Mapping[str, list[tuple[str, str, str | None]]]
    elements: Mapping[tuple[str, int], list[str]]


def _sliced_buffers(name: str, num_buffers: int, program: _Program) -> list[bool]:
    """Per buffer of an all-reduce: is it only ever sliced afterwards? (A combined
    all-reduce carries several; each is read by its own get-tuple-element.)"""
    def sliced(user: str) -> bool:
        return _only_sliced(user, program.consumers, program.computations)

    if num_buffers == 1:
        return [sliced(name)]
    return [bool(program.elements.get((name, i)))
            and all(sliced(read) for read in program.elements[(name, i)])
            for i in range(num_buffers)]


def _collectives_of(parts, count: int, mesh_shape, ici_shape, program: _Program
                    ) -> list[Collective]:
    """The Collective(s) of one instruction: an all-reduce's buffers that are only
    sliced afterwards (a reduce-scatter) apart from the others."""
    name, type_str, opcode, rest = parts
    op = opcode.removesuffix("-start")
    arrays = _arrays(type_str)
    if opcode.endswith("-start") and len(arrays) > 1:
        # (operands..., results..., and for a permute two u32 scalars of context)
        arrays = [a for a in arrays if not (a[0] in ("u32", "s32") and a[1] == 4)] or arrays
        arrays = arrays[len(arrays) // 2:]
    groups = replica_groups(rest, math.prod(mesh_shape.values()))
    axes, nodes = _span(groups, mesh_shape, ici_shape)
    size = groups.shape[1]
    flags = [False] * len(arrays)
    if op == "all-reduce" and size > 1 and not opcode.endswith("-start"):
        flags = _sliced_buffers(name, len(arrays), program)
    widened = (re.search(r"to_apply=%\S*_promoted\b", rest) is not None
               and all(dtype == "f32" for dtype, _ in arrays))
    source = re.search(r'op_name="([^"]*)"', rest)
    out = []
    for sliced in (False, True):
        part = [array for array, flag in zip(arrays, flags) if flag == sliced]
        if part:
            nbytes = sum(b for _, b in part) * (size if op == "reduce-scatter" else 1)
            dtype = max(part, key=lambda a: a[1])[0]
            if widened:
                dtype, nbytes = "bf16", nbytes // 2
            out.append(Collective(name, op, dtype, nbytes, size, axes, nodes, count,
                                  sliced, widened, source.group(1) if source else ""))
    return out


def parse(hlo_text: str, mesh_shape: Mapping[str, int],
          ici_shape: Mapping[str, int] | None = None) -> list[Collective]:
    """The collectives of a compiled SPMD program over a mesh of `mesh_shape` (named
    axis sizes, in the mesh's order); `ici_shape` gives each axis's size inside one
    node (default: the whole mesh is one node)."""
    computations, entry = _computations(hlo_text)
    runs = execution_counts(computations, entry)
    program = _Program(computations, _consumers(computations), _tuple_elements(computations))
    out = []
    for computation, lines in computations.items():
        for line in lines:
            parts = _split_instruction(line)
            if not parts or parts[2].removesuffix("-start") not in COLLECTIVE_OPS:
                continue
            if runs[computation] is None:
                raise ValueError(
                    f"Cannot tell how often {parts[0]} runs: a while loop around it has no "
                    "readable trip count (neither known_trip_count nor an `i < N` "
                    "condition). Its collectives cannot be counted per step.")
            out += _collectives_of(parts, runs[computation], mesh_shape,
                                   ici_shape or mesh_shape, program)
    return out


# ------------------------------------------------------------------- largest arrays

# Results that name another buffer's memory, not a new one.
_ALIASES = ("tuple", "get-tuple-element", "bitcast", "parameter", "constant")


def largest_arrays(hlo_text: str, n: int | None = 5) -> list[dict[str, object]]:
    """The `n` largest arrays a compiled program materialises: results of instructions
    outside fused computations (a fusion's insides live in registers or on-chip memory;
    its result is the buffer), tuples, bitcasts, parameters and constants left out.
    Each: {'name', 'op', 'dtype', 'shape', 'bytes'}; a way to see whether, say, an
    attention's [B, H, L, L] scores remain in a step. n=None: all of them."""
    computations, _ = _computations(hlo_text)
    fused: set[str] = set()
    for lines in computations.values():
        for line in lines:
            parts = _split_instruction(line)
            if parts and parts[2] == "fusion":
                fused.update(m.group(2).strip("%,") for m in _CALLED.finditer(parts[3])
                             if m.group(1) == "calls")
    found = []
    for name, lines in computations.items():
        if name in fused:
            continue
        for line in lines:
            parts = _split_instruction(line)
            if not parts or parts[2] in _ALIASES or parts[1].startswith("("):
                continue
            match = _ARRAY.match(parts[1])
            if match and match.group(1) in _DTYPE_BYTES:
                shape = [int(d) for d in match.group(2).split(",") if d]
                found.append({"name": parts[0], "op": parts[2], "dtype": match.group(1),
                              "shape": shape,
                              "bytes": math.prod(shape) * _DTYPE_BYTES[match.group(1)]})
    return sorted(found, key=lambda a: -a["bytes"])[:n]


# ------------------------------------------------------------------------- link times


def _fraction(op: str, ways: int) -> float:
    """Bytes each device sends per byte of S over `ways` devices (ring algorithms)."""
    if ways <= 1:
        return 0.0
    if op == "collective-permute":
        return 1.0
    # A ring all-reduce is a reduce-scatter then an all-gather: twice the traffic.
    return (2.0 if op == "all-reduce" else 1.0) * (ways - 1) / ways


def seconds(c: Collective, intra_node_bytes_per_s: float | None,
            inter_node_bytes_per_s: float | None, devices_per_node: int) -> float | None:
    """Time of one execution of `c`: a group of n devices over k nodes, g = n/k in each,
    runs its in-node part at the intra-node bandwidth and its across-node part on S/g
    per device at the device's share of the node network (hierarchical, as NCCL does);
    an all-to-all sends its off-node share S·(k-1)/k through that share whole.
    None when the table lacks a bandwidth the collective needs."""
    k = c.nodes
    g = max(1, c.group_size // k)
    total = 0.0
    if g > 1:
        if intra_node_bytes_per_s is None:
            return None
        total += _fraction(c.priced_as, g) * c.buffer_bytes / intra_node_bytes_per_s
    if k > 1:
        if inter_node_bytes_per_s is None:
            return None
        per_device = inter_node_bytes_per_s / devices_per_node
        share = c.buffer_bytes if c.op == "all-to-all" else c.buffer_bytes / g
        total += _fraction(c.priced_as, k) * share / per_device
    return total


def scale_axis(c: Collective, axis: str, sizes: tuple[int, int],
               nodes: tuple[int, int]) -> Collective:
    """`c` as it runs when mesh axis `axis` grows from sizes[0] to sizes[1] devices,
    spread over nodes[1] instead of nodes[0] nodes (the data-parallel axis of a mesh
    planned at a reduced size): a group along the whole axis has proportionally more
    members and nodes; each member contributes the same, so the buffer of an
    all-gather (the gathered result) grows with the group and the others stay."""
    if axis not in c.mesh_axes:
        return c
    group = c.group_size // sizes[0] * sizes[1]
    nbytes = c.buffer_bytes * group // c.group_size if c.op == "all-gather" else c.buffer_bytes
    return dataclasses.replace(c, group_size=group, buffer_bytes=nbytes,
                               nodes=max(1, c.nodes // nodes[0]) * nodes[1])
