"""Pictures of a partitioned graph: Graphviz source and an SVG drawn with matplotlib.

Nodes are coloured by stage; edges that cross a stage boundary are drawn dark and labelled
with the bytes they carry. The SVG needs no Graphviz: nodes sit in one lane per stage, in
program order from left to right.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

_PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]


def _colour(stage: int) -> str:
    return _PALETTE[stage % len(_PALETTE)]


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _drawn_nodes(graph: nx.DiGraph) -> list[str]:
    """Nodes worth drawing: parameter reads are left out, they are part of their readers."""
    return sorted(
        (n for n in graph.nodes if graph.nodes[n]["op"] != "get_attr"),
        key=lambda n: graph.nodes[n]["order"],
    )


def to_dot(graph: nx.DiGraph, assignment: dict[str, int]) -> str:
    """Graphviz source: one cluster per stage, cut edges labelled with their bytes."""
    nodes = _drawn_nodes(graph)
    lines = [
        "digraph partition {",
        "  rankdir=TB;",
        '  node [shape=box, style=filled, fontname="Helvetica"];',
    ]
    for stage in sorted({assignment[n] for n in nodes}):
        lines.append(
            f'  subgraph cluster_{stage} {{ label="stage {stage}"; color="{_colour(stage)}";'
        )
        for n in nodes:
            if assignment[n] == stage:
                lines.append(f'    "{n}" [fillcolor="{_colour(stage)}", label="{n}"];')
        lines.append("  }")
    drawn = set(nodes)
    for u, v, data in graph.edges(data=True):
        if u not in drawn or v not in drawn:
            continue
        if assignment[u] != assignment[v]:
            lines.append(f'  "{u}" -> "{v}" [label="{_megabytes(data["bytes"])}", penwidth=2];')
        else:
            lines.append(f'  "{u}" -> "{v}" [color="gray60"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_svg(graph: nx.DiGraph, assignment: dict[str, int], path: Path) -> None:
    """An SVG with one lane per stage and program order from left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = _drawn_nodes(graph)
    position = {n: (i, -assignment[n]) for i, n in enumerate(nodes)}
    n_stages = 1 + max(assignment[n] for n in nodes)
    figure, axes = plt.subplots(figsize=(min(4 + 0.12 * len(nodes), 200), 1.5 + 1.2 * n_stages))
    labelled: set[tuple[str, int]] = set()
    for u, v, data in graph.edges(data=True):
        if u not in position or v not in position:
            continue
        (x0, y0), (x1, y1) = position[u], position[v]
        cut = assignment[u] != assignment[v]
        axes.plot(
            [x0, x1],
            [y0, y1],
            color="black" if cut else "#cccccc",
            linewidth=1.2 if cut else 0.6,
            zorder=1,
        )
        if cut and (u, assignment[v]) not in labelled:
            labelled.add((u, assignment[v]))
            axes.annotate(
                _megabytes(data["bytes"]), ((x0 + x1) / 2, (y0 + y1) / 2), fontsize=6, ha="center"
            )
    xs, ys = zip(*(position[n] for n in nodes))
    axes.scatter(xs, ys, c=[_colour(assignment[n]) for n in nodes], s=18, zorder=2)
    axes.set_yticks([-s for s in range(n_stages)], [f"stage {s}" for s in range(n_stages)])
    axes.set_xlabel("operations in program order")
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, format="svg")
    plt.close(figure)


def write_pictures(graph: nx.DiGraph, assignment: dict[str, int], path: str | Path) -> list[Path]:
    """Write ``PATH.dot`` (Graphviz) and ``PATH.svg``; returns the paths written."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".dot", ".svg") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    dot_path, svg_path = base.with_suffix(".dot"), base.with_suffix(".svg")
    dot_path.write_text(to_dot(graph, assignment))
    draw_svg(graph, assignment, svg_path)
    return [dot_path, svg_path]
