"""The report's relations section: one relation graph per class from ``RUN/relate/relations.json``.

Nodes are the class's top global concepts that take part in a KG relation; an edge is a KG relation
between two of them, drawn solid and dark when the model's maps ground it (support ≥ the run's
minimum), dashed and grey when the KG states it but the maps do not bear it out, and red-dotted
for a negative relation (``Not*``, ``Antonym``, ``DistinctFrom``). Layout by networkx (circular,
so the same relations always give the same picture), drawing by matplotlib.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["relations_section", "draw_relation_graph"]


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "class"


def draw_relation_graph(path: Path, title: str, candidates: list[dict], recovered: set, dpi: int = 100) -> None:
    """Draw one class's relation graph into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx

    from conceptrank.core.relations import is_negative
    from conceptrank.io.cache import atomic_write

    g = nx.MultiDiGraph()
    for c in candidates:
        h, r, t = c["relation"]
        g.add_edge(h, t, relation=r, support=c.get("support"), grounded=tuple(c["relation"]) in recovered)
    pos = nx.circular_layout(sorted(g.nodes))
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#e8eef7", edgecolors="#4a6fa5", node_size=1400)
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=9)
    styles = {"grounded": ("#1b5e20", "solid", 2.2), "kg": ("#9e9e9e", "dashed", 1.0), "negative": ("#c62828", "dotted", 1.0)}
    labels: dict[bool, dict] = {False: {}, True: {}}  # grounded → (u, v) → label lines
    for k, (u, v, d) in enumerate(g.edges(data=True)):
        kind = "negative" if is_negative(d["relation"]) else ("grounded" if d["grounded"] else "kg")
        color, style, width = styles[kind]
        nx.draw_networkx_edges(g, pos, edgelist=[(u, v)], ax=ax, edge_color=color, style=style, width=width,
                               arrows=True, arrowsize=12, node_size=1400, connectionstyle=f"arc3,rad={0.08 * (k % 3)}")
        sup = d.get("support")
        text = d["relation"] + (f" {sup:.2f}" if isinstance(sup, (int, float)) else "")
        labels[kind == "grounded"].setdefault((u, v), []).append(text)
    for grounded, font in ((False, dict(font_size=8, font_color="#616161")),  # grounded ones last: on top
                           (True, dict(font_size=9, font_color="#1b5e20", font_weight="bold"))):
        if labels[grounded]:
            nx.draw_networkx_edge_labels(g, pos, edge_labels={e: "\n".join(v) for e, v in labels[grounded].items()},
                                         ax=ax, **font)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


GRAPHS_DIR = "graphs"  # RUN/relate/graphs/: the class graphs, drawn once per relations.json and dpi


def _graphs_key(src: Path, dpi: int) -> str:
    import hashlib

    return hashlib.sha256(src.read_bytes() + f"|dpi={dpi}|v=1".encode()).hexdigest()


def draw_class_graphs(root: Path, dpi: int = 100) -> Path | None:
    """Draw every class's relation graph into ``RUN/relate/graphs/`` (skipped when the PNGs there were
    drawn from the same ``relations.json`` at the same dpi); None without ``relate/relations.json``."""
    from conceptrank.io.cache import atomic_write_text, read_json

    src = Path(root) / "relate" / "relations.json"
    if not src.is_file():
        return None
    out, key = src.parent / GRAPHS_DIR, _graphs_key(src, dpi)
    stamp = out / "key.txt"
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == key:
        return out
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for name, c in sorted((read_json(src).get("classes") or {}).items()):
        if c.get("candidates"):
            draw_relation_graph(out / f"{_slug(name)}.png", name, c["candidates"],
                                {tuple(r) for r in c.get("recovered", [])}, dpi)
    atomic_write_text(stamp, key + "\n")  # last: a stamp vouches for every PNG
    return out


def relations_section(root: Path, figdir: Path, dpi: int = 100) -> dict | None:
    """Context for the report's relations section, or None when the run has no ``relate/relations.json``."""
    import shutil

    from conceptrank.io.cache import read_json

    src = Path(root) / "relate" / "relations.json"
    if not src.is_file():
        return None
    doc = read_json(src)
    drawn = draw_class_graphs(root, dpi)
    out_dir = Path(figdir) / "relations"
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = []
    for name, c in sorted((doc.get("classes") or {}).items()):
        entry = {"name": name, "id": f"relations-{_slug(name)}", "recovered": [" ".join(r) for r in c.get("recovered", [])],
                 "planted": [" ".join(r) for r in c.get("planted", [])], "coverage": c.get("coverage"),
                 "precision": c.get("precision"), "recall": c.get("recall"), "src": None}
        if c.get("candidates"):
            png = out_dir / f"{_slug(name)}.png"
            shutil.copyfile(drawn / png.name, png)
            entry["src"] = f"{figdir.name}/relations/{png.name}"
        classes.append(entry)
    kg = doc.get("kg") or {}
    return {"classes": classes, "summary": doc.get("summary") or {}, "kg": kg.get("path", ""),
            "unmatched": doc.get("unmatched_concepts", []), "definitions": doc.get("definitions", {})}
