"""The whole pipeline: synth → dissect → extract → rank → evaluate → report.

``run_demo`` drives it on the embedded synthetic world; ``run_from_config`` on whatever a TOML file
names (e.g. ResNet-152 + Broden + Stanford 40, see ``examples/``).
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from .errors import ConceptrankError

__all__ = ["RunConfig", "load_run_config", "run_pipeline", "run_demo", "run_from_config"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run needs; mirrors the TOML file's sections.

    TOML layout::

        out = "runs/resnet152"
        [model]    name = "resnet152"; weights = "IMAGENET1K_V1"; layer = "layer4"
        [probe]    path = "data/broden1_224"; categories = ["object", "part", "material", "color"]
        [target]   path = "data/Stanford40"; layout = "stanford40"; resize = 224
        [rank]     protocol = "standard"; top_local = 10; top_global = 10
        [evaluate] configs = "5:1,5:5,5:10,10:10"
        [run]      device = "auto"; batch_size = 64; workers = 4; seed = 0; report = true
    """

    out: Path
    model: str
    layer: str
    probe: Path
    target: Path
    weights: str | None = None
    categories: tuple[str, ...] | None = None
    quantile: float = 0.005
    stability_quantile: float | None = 0.01
    preprocess: str = "model"
    layout: str = "auto"
    resize: int | None = None
    crop: str = "none"
    protocol: str = "standard"
    top_local: int = 10
    top_global: int = 10
    min_iou: float | None = None
    grid: bool = False
    configs: str = "5:1,5:5,5:10,10:10"
    truth: Path | None = None
    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    seed: int = 0
    report: bool = True
    tally: Path | None = None  # start from an existing NetDissect-Lite tally.csv instead of dissecting


_SECTIONS = {
    "model": {"name": "model", "weights": "weights", "layer": "layer"},
    "probe": {"path": "probe", "categories": "categories", "quantile": "quantile", "preprocess": "preprocess",
              "stability_quantile": "stability_quantile",
              "tally": "tally"},
    "target": {"path": "target", "layout": "layout", "resize": "resize", "crop": "crop"},
    "rank": {"protocol": "protocol", "top_local": "top_local", "top_global": "top_global", "min_iou": "min_iou",
             "grid": "grid"},
    "evaluate": {"configs": "configs", "truth": "truth"},
    "run": {"device": "device", "batch_size": "batch_size", "workers": "workers", "seed": "seed", "report": "report"},
}


def load_run_config(path: str | Path) -> RunConfig:
    """Parse a TOML run configuration; unknown sections or keys are errors naming them."""
    path = Path(path)
    if not path.exists():
        raise ConceptrankError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConceptrankError(f"{path}: invalid TOML ({e})") from None
    kw: dict = {}
    base = path.parent
    for key, value in data.items():
        if key == "out":
            kw["out"] = value
            continue
        if key not in _SECTIONS:
            raise ConceptrankError(f"{path}: unknown section or key {key!r}; expected out, {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise ConceptrankError(f"{path}: [{key}] must be a table")
        for k, v in value.items():
            if k not in _SECTIONS[key]:
                raise ConceptrankError(f"{path}: unknown key {k!r} in [{key}]; expected {', '.join(_SECTIONS[key])}")
            kw[_SECTIONS[key][k]] = v
    for req in ("out", "model", "layer", "probe", "target"):
        if req not in kw and not (req == "probe" and "tally" in kw):
            raise ConceptrankError(f"{path}: missing required setting {req!r}")
    for k in ("out", "probe", "target", "truth", "tally"):
        if kw.get(k) is not None:
            p = Path(kw[k]).expanduser()
            kw[k] = p if p.is_absolute() else base / p
    if "categories" in kw and kw["categories"] is not None:
        cats = kw["categories"]
        kw["categories"] = tuple(cats.split(",") if isinstance(cats, str) else cats)
    kw.setdefault("probe", None)
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in kw.items() if k in names})


@dataclass(frozen=True)
class PipelineResult:
    out: Path
    dissect: object | None
    extract: object
    rank: object
    evaluate: object
    report: Path | None
    timings: dict = field(default_factory=dict)


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> PipelineResult:
    """dissect → extract → rank → evaluate (→ report) as the config says; returns every stage's result."""
    from .dissect import DissectConfig, run_dissect
    from .evaluate import EvaluateConfig, run_evaluate
    from .extract import ExtractConfig, run_extract
    from .models import load_model
    from .rank import RankConfig, run_rank

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    model = load_model(cfg.model, cfg.weights)
    from dataclasses import asdict

    from .cache import atomic_write_json

    atomic_write_json(out / "run.json", {"config": asdict(cfg), "model": model.describe()})

    t0 = time.perf_counter()
    dres = None
    if cfg.tally is not None:
        tally = Path(cfg.tally)
        echo(f"[dissect] using existing tally {tally}")
    else:
        from .data.broden import BrodenDataset
        from .dissect import dissect

        dcfg = DissectConfig(categories=cfg.categories, quantile=cfg.quantile, preprocess=cfg.preprocess,
                             batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                             stability_quantile=cfg.stability_quantile)
        (dres,) = dissect(model, [cfg.layer], BrodenDataset(cfg.probe, cfg.categories), out / "dissect", dcfg)
        tally = out / "dissect" / "tally.csv"
        echo(dres.summary())
    timings["dissect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ecfg = ExtractConfig(layout=cfg.layout, resize=cfg.resize, crop=cfg.crop, batch_size=cfg.batch_size,
                         workers=cfg.workers, device=cfg.device)
    eres = run_extract(model, cfg.weights, cfg.layer, cfg.target, out / "extract", ecfg)
    echo(eres.summary())
    timings["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rcfg = RankConfig(protocol=cfg.protocol, top_local=cfg.top_local, top_global=cfg.top_global, min_iou=cfg.min_iou,
                      categories=cfg.categories, seed=cfg.seed, grid=cfg.grid)
    rres = run_rank(out / "extract", tally, out / "rank", rcfg)
    echo(rres.summary())
    timings["rank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vcfg = EvaluateConfig(configs=cfg.configs, truth=cfg.truth, seed=cfg.seed)
    vres = run_evaluate(out / "rank", out / "rank", vcfg)
    echo(vres.table())
    timings["evaluate"] = time.perf_counter() - t0

    report = None
    if cfg.report:
        try:
            from .report import write_report
        except ImportError:  # the report module is optional while it is being built
            write_report = None
        if write_report is not None:
            t0 = time.perf_counter()
            report = write_report(out)
            timings["report"] = time.perf_counter() - t0
            echo(f"report: {Path(report).resolve()}")
    return PipelineResult(out, dres, eres, rres, vres, report, timings)


def run_from_config(path: str | Path, echo: Callable[[str], None] = print) -> PipelineResult:
    return run_pipeline(load_run_config(path), echo)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             echo: Callable[[str], None] = print) -> PipelineResult:
    """Generate the synthetic world (unless already there for these parameters) and run every stage."""
    from .data.synthetic import generate_world

    out = Path(out)
    t0 = time.perf_counter()
    params = dict(seed=seed, size=32 if quick else 64, probe_images=160 if quick else 1200,
                  images_per_class=20 if quick else 80)
    world = out / "world"
    echo(f"[synth] synthetic concept world -> {world}")
    info = generate_world(world, train_model=True, progress=not quick, **params)
    echo(info.summary())
    cfg = RunConfig(
        out=out, model=str(world / "model"), layer="layer4", probe=world / "probe", target=world / "target",
        truth=world / "truth.json", seed=seed, workers=0 if quick else 2, batch_size=64,
    )
    res = run_pipeline(cfg, echo)
    echo(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return res
