"""A compiled program's cost per device (FLOPs, bytes accessed) from the compiler's cost analysis, with its
while loops counted as many times as they run.

`compiled.cost_analysis()` (XLA's HloCostAnalysis) is per device: an 8-way sharded matmul of 2*M*N*K FLOPs
reports 2*M*N*K / 8. But it counts the body of a while loop once, whatever its trip count (jax#18672): a
train step with scanned layers and a gradient-accumulation loop would be undercounted by layers x
microbatches. So the compiled HLO text is read for its while loops and their trip counts (XLA's
`known_trip_count` annotation where the backend keeps it, as XLA:CPU does; otherwise, as on TPU, a counted
loop `i < N` whose counter starts at a known value and grows by a known step, e.g. the SPMD partitioner's
windowed matmul loops that step by 2), each loop body's own cost is taken by the same analysis run on that
body alone (as the entry of a copy of the module, analysed on the host's CPU client), and the program's
cost gains (executions - 1) x that body's exclusive cost. The top-level figure stays the compiler's own. A
loop whose trip count cannot be read makes the cost unknown (None), never zero.

Custom calls (Pallas/Mosaic kernels such as splash attention) are opaque to the analysis: their FLOPs are
not counted, so a program that uses one is under-counted by that kernel's work (`Cost.note` says so).
"""

from __future__ import annotations

import dataclasses
import re

_HEADER = re.compile(r"^(ENTRY )?%([^\s(]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([^\s=]+) = .*?\s([a-z][a-z0-9\-]*)\((.*?)\)(,|$)")
_CALLEES = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation|select|scatter)=%([^\s,}]+)"
    r"|(?:branch_computations|called_computations|calls)=\{([^}]*)\}"
)
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")  # Mosaic (TPU) and Triton (GPU) kernels
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device cost of one program; None where unknown (a missing key, an unreadable loop)."""

    flops: float | None
    bytes_accessed: float | None
    transcendentals: float | None = None
    loops: tuple[str, ...] = ()  # each while loop's executions, e.g. "2" then "2x32" for one nested in it
    note: str = ""


def _raw(compiled) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jaxlibs: one dict per program (always one here)
        analysis = analysis[0] if analysis else None
    return dict(analysis or {})


@dataclasses.dataclass
class _Computation:
    name: str
    header: int  # line index of its header
    lines: list[str]


def _computations(text: str) -> tuple[dict[str, _Computation], str]:
    """The computations of an HLO module's text, by name, and the entry's name."""
    out, entry, current = {}, "", None
    for i, line in enumerate(text.splitlines()):
        found = _HEADER.match(line)
        if found and current is None:
            current = _Computation(found.group(2), i, [])
            entry = found.group(2) if found.group(1) else entry
        elif current is not None and line.strip() == "}":
            out[current.name] = current
            current = None
        elif current is not None:
            current.lines.append(line)
    return out, entry


def _definitions(comp: _Computation) -> dict[str, tuple[str, list[str], str]]:
    """name -> (opcode, operand names, the line)."""
    defs = {}
    for line in comp.lines:
        found = _INSTRUCTION.match(line)
        if found:
            operands = re.findall(r"%([^\s,)]+)", found.group(4))
            defs[found.group(2)] = (found.group(3), operands, line)
    return defs


@dataclasses.dataclass
class _Scope:
    """Where names resolve: a computation's instructions and, for a loop body or condition, the loop's
    next-iteration tuple (body root) and start tuple (in the caller's scope), so that a loop-invariant
    element (a constant passed into the loop) resolves to its start value."""

    defs: dict
    next_values: list[str] | None = None
    start: list[str] | None = None
    outer: _Scope | None = None
    body_defs: dict | None = None  # a condition's loop body, where an element's invariance is read


def _operands(text: str) -> list[str]:
    return re.findall(r"%([^\s,)]+)", text)


def _through_copies(defs, name: str) -> str:
    for _ in range(16):
        if name not in defs or defs[name][0] not in ("copy", "bitcast", "convert") or len(defs[name][1]) != 1:
            return name
        name = defs[name][1][0]
    return name


def _tuple_index(defs, name: str) -> int | None:
    """k when `name` is get-tuple-element(the parameter, index=k) (through copies)."""
    name = _through_copies(defs, name)
    if name not in defs or defs[name][0] != "get-tuple-element":
        return None
    param = defs.get(defs[name][1][0] if defs[name][1] else "")
    found = re.search(r"index=(\d+)", defs[name][2])
    return int(found.group(1)) if found and param and param[0] == "parameter" else None


def _value(scope: _Scope, name: str) -> int | None:
    """The integer a scalar resolves to (a constant, through copies and loop-invariant loop elements)."""
    name = _through_copies(scope.defs, name)
    if name not in scope.defs:
        return None
    opcode, _, line = scope.defs[name]
    if opcode == "constant":
        found = re.search(r"constant\((-?\d+)\)", line)
        return int(found.group(1)) if found else None
    k = _tuple_index(scope.defs, name)
    if k is None or scope.next_values is None or scope.start is None or scope.outer is None:
        return None
    if k >= len(scope.next_values) or k >= len(scope.start):
        return None
    if (
        _tuple_index(scope.body_defs or scope.defs, scope.next_values[k]) != k
    ):  # changes from one iteration to the next
        return None
    return _value(scope.outer, scope.start[k])


def _root(comp: _Computation) -> tuple[str, list[str]]:
    line = next((ln for ln in comp.lines if ln.lstrip().startswith("ROOT ")), "")
    found = _INSTRUCTION.match(line)
    return (found.group(3), _operands(found.group(4))) if found else ("", [])


def _loop_scopes(line: str, comps, caller: _Scope, operands) -> tuple[_Scope, _Scope] | None:
    cond = comps.get(re.search(r"condition=%([^\s,]+)", line).group(1))
    body = comps.get(re.search(r"body=%([^\s,]+)", line).group(1))
    if cond is None or body is None or len(operands) != 1:
        return None
    start = caller.defs.get(operands[0])
    start_names = start[1] if start is not None and start[0] == "tuple" else None
    body_defs = _definitions(body)
    opcode, next_values = _root(body)
    next_values = next_values if opcode == "tuple" else None
    body_scope = _Scope(body_defs, next_values, start_names, caller)
    cond_scope = _Scope(_definitions(cond), next_values, start_names, caller, body_defs)
    return body_scope, cond_scope


def _trip_count(
    line: str, body: _Scope | None, cond_comp: _Computation | None, cond: _Scope | None
) -> int | None:
    """A while loop's trip count: XLA's annotation, else a counted loop `i < N` (or `N > i`) whose counter
    starts at a known value and grows by a known step."""
    found = _TRIP.search(line)
    if found:
        return int(found.group(1))
    if body is None or cond is None or cond_comp is None or body.next_values is None or body.start is None:
        return None
    opcode, compared = _root(cond_comp)
    root = next((ln for ln in cond_comp.lines if ln.lstrip().startswith("ROOT ")), "")
    direction = re.search(r"direction=(\w+)", root)
    if opcode != "compare" or len(compared) < 2 or not direction or direction.group(1) not in ("LT", "GT"):
        return None
    counter, limit_name = compared[:2] if direction.group(1) == "LT" else compared[1::-1]
    index, limit = _tuple_index(cond.defs, counter), _value(cond, limit_name)
    if index is None or limit is None or index >= len(body.start) or index >= len(body.next_values):
        return None
    start = _value(body.outer, body.start[index])
    step_name = _through_copies(body.defs, body.next_values[index])
    if start is None or body.defs.get(step_name, ("",))[0] != "add":
        return None
    add_operands = body.defs[step_name][1]
    counters = [o for o in add_operands if _tuple_index(body.defs, o) == index]
    steps = [_value(body, o) for o in add_operands if o not in counters]
    if len(counters) != 1 or len(steps) != 1 or not steps[0] or steps[0] < 0:
        return None
    return max(0, -(-(limit - start) // steps[0]))


@dataclasses.dataclass
class _Loop:
    body: str
    trip: int | None
    outer: int  # executions of the computation the loop is in (product of enclosing trip counts)
    path: str  # e.g. "2x32"
    inner: list[str] = dataclasses.field(default_factory=list)  # bodies of the loops directly inside


def _loops(text: str) -> tuple[list[_Loop], dict[str, _Computation], str]:
    comps, entry = _computations(text)
    loops: list[_Loop] = []

    def walk(name: str, scope: _Scope | None, outer: int, path: str, parent: _Loop | None, seen) -> None:
        comp = comps.get(name)
        if comp is None or name in seen:
            return
        scope = scope or _Scope(_definitions(comp))
        for line in comp.lines:
            found = _INSTRUCTION.match(line)
            if found and found.group(3) == "while":
                body = re.search(r"body=%([^\s,]+)", line).group(1)
                cond_comp = comps.get(re.search(r"condition=%([^\s,]+)", line).group(1))
                scopes = _loop_scopes(line, comps, scope, _operands(found.group(4)))
                body_scope, cond_scope = scopes or (None, None)
                trip = _trip_count(line, body_scope, cond_comp, cond_scope)
                label = (
                    f"{path}x{trip if trip is not None else '?'}"
                    if path
                    else f"{trip if trip is not None else '?'}"
                )
                loop = _Loop(body, trip, outer, label)
                loops.append(loop)
                if parent is not None:
                    parent.inner.append(body)
                walk(body, body_scope, outer * (trip or 1), label, loop, seen | {name})
                continue
            if not found or found.group(3) == "fusion":  # fusions hold no loops
                continue
            for callee, branches in _CALLEES.findall(line):
                for target in [callee] if callee else re.findall(r"%([^\s,}]+)", branches):
                    walk(target, None, outer, path, parent, seen | {name})

    walk(entry, None, 1, "", None, frozenset())
    return loops, comps, entry


def _body_cost(lines: list[str], comps: dict[str, _Computation], body: str) -> dict[str, float]:
    """The cost analysis of one loop body alone: a copy of the module with that body as its entry."""
    import jax
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    # Only the body and what it calls (a parse of the whole module per loop would take minutes at scale);
    # the original entry's layout and flags do not apply to the body.
    needed, stack = set(), [body]
    while stack:
        name = stack.pop()
        if name in needed or name not in comps:
            continue
        needed.add(name)
        for line in comps[name].lines:
            for callee, listed in _CALLEES.findall(line):
                stack += [callee] if callee else re.findall(r"%([^\s,}]+)", listed)
    first = min(c.header for c in comps.values())
    out = ["HloModule loop_body", *lines[1:first]]  # the stack-frame tables the metadata refers to
    for comp in sorted((comps[n] for n in needed), key=lambda c: c.header):
        header = lines[comp.header].removeprefix("ENTRY ")
        out += [("ENTRY " if comp.name == body else "") + header, *comp.lines, "}", ""]
    module = _hlo.hlo_module_from_text("\n".join(out))
    return xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def program_cost(compiled) -> Cost:
    """Per-device FLOPs, bytes accessed and transcendentals of a compiled program, loops counted in full."""
    try:
        raw = _raw(compiled)
    except Exception as e:  # noqa: BLE001 - a backend without a cost analysis: the cost is unknown
        return Cost(None, None, note=f"no cost analysis: {str(e).splitlines()[0][:120]}")
    keys = ("flops", "bytes accessed", "transcendentals")
    totals = {k: (float(raw[k]) if k in raw and raw[k] >= 0 else None) for k in keys}
    if totals["flops"] is None and totals["bytes accessed"] is None:
        return Cost(None, None, note="the compiler reports no cost for this program")
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001
        text = ""
    kernels = sum(text.count(f'custom_call_target="{target}"') for target in _KERNEL_TARGETS)
    note = (
        f"{kernels} Pallas kernel call(s) (custom calls) not counted by the analysis: a lower bound"
        if kernels
        else ""
    )
    if " while(" not in text:
        return Cost(totals["flops"], totals["bytes accessed"], totals["transcendentals"], note=note)
    loops, comps, entry = _loops(text)
    if any(loop.trip is None for loop in loops):
        unread = [loop.path for loop in loops if loop.trip is None]
        paths = tuple(loop.path for loop in loops)
        return Cost(None, None, loops=paths, note=f"loop trip count unread: {unread}")
    try:
        lines = text.splitlines()
        inclusive = {loop.body: _body_cost(lines, comps, loop.body) for loop in loops}
    except Exception as e:  # noqa: BLE001 - a body the host cannot analyse leaves the cost unknown
        paths = tuple(loop.path for loop in loops)
        return Cost(None, None, loops=paths, note=f"loop body not analysed: {str(e).splitlines()[0][:120]}")
    for key in keys:
        if totals[key] is None:
            continue
        for loop in loops:
            own = inclusive[loop.body].get(key, 0.0) - sum(inclusive[b].get(key, 0.0) for b in loop.inner)
            totals[key] += (loop.outer * loop.trip - 1) * own
    return Cost(
        totals["flops"],
        totals["bytes accessed"],
        totals["transcendentals"],
        loops=tuple(loop.path for loop in loops),
        note=note,
    )
