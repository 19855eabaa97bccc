"""The class rules of a run (``RUN/rules/rules.json``) shaped for the report's class sections."""

from __future__ import annotations

from pathlib import Path

__all__ = ["class_rules"]


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def class_rules(run: str | Path) -> dict:
    """``{"available": bool, "about": str, "classes": {class: {"rules": [...], "line": str}}}``.

    Each rule row: id, clause, literals (concept, positive), support, confidence, coverage (train) and
    on the test split the images it fires on, decides, and decides correctly.
    """
    from conceptrank.errors import ConceptrankError
    from conceptrank.stages.rules import read_rules

    try:
        doc = read_rules(Path(run) / "rules")
    except ConceptrankError as e:
        return {"available": False, "about": str(e), "classes": {}}
    if doc is None:
        return {"available": False, "about": "no rules (run `conceptrank rules --run RUN`)", "classes": {}}
    t = doc["scores"]["test"]
    about = (f"{doc['learner']} on {doc['facts']['method']} facts, learned from the SVM's train predictions; "
             f"test: fidelity {_fmt(t['fidelity'])}, accuracy {_fmt(t['accuracy'])} (SVM {_fmt(doc['svm_test_accuracy'])}), "
             f"coverage {_fmt(t['coverage'])}, {t['rules']} rules, {t['literals_per_rule']:.2f} literals per rule")
    classes: dict[str, dict] = {c: {"rules": [], "line": ""} for c in doc["classes"]}
    for r in doc["rules"]:
        classes[r["class"]]["rules"].append({
            "id": r["id"], "clause": r["clause"], "support": r["support"], "confidence": _fmt(r["confidence"]),
            "coverage": _fmt(r["coverage"]), "fires": r["test"]["fires"], "decides": r["test"]["decides"],
            "correct": r["test"]["correct"],
            "literals": [{"concept": lit["concept"] or lit["predicate"], "positive": lit["positive"]} for lit in r["literals"]],
        })
    for c, entry in classes.items():
        if c in doc.get("classes_without_positive_train_image", []):
            entry["line"] = "no rule: no train image was predicted as this class"
        elif not entry["rules"]:
            entry["line"] = "no rule found within the budget"
    return {"available": True, "about": about, "classes": classes}
