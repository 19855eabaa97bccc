"""The whole pipeline: synth → dissect → extract → rank → evaluate → report.

``run_demo`` drives it on the embedded synthetic world; ``run_from_config`` on whatever a TOML file
names (e.g. ResNet-152 + Broden + Stanford 40, see ``examples/``).

Rerunning is cheap: every stage reuses its outputs when its manifest was written for the same key
(see :mod:`conceptrank.io.cache`), and says so; the synthetic world is regenerated only when its
parameters, the package versions or any of its files changed (``DIR/.world.json``).
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from conceptrank.errors import ConceptrankError, ConfigError

__all__ = ["RunConfig", "load_run_config", "validate_run_config", "run_pipeline", "run_demo", "run_from_config"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a pipeline run needs; mirrors the TOML file's sections.

    TOML layout::

        out = "runs/resnet152"
        [model]    name = "resnet152"; weights = "IMAGENET1K_V1"; layer = "layer4"
        [probe]    path = "data/broden1_224"; categories = ["object", "part", "material", "color"]
        [target]   path = "data/Stanford40"; layout = "stanford40"; resize = 224; split_map = "val=train"
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
    split_map: str = ""
    protocol: str = "standard"
    ranker: str | None = None  # None: the protocol's (conceptrank.core.rankers.resolve_ranker)
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
    report_max_units: int | None = 300  # unit cards need a forward pass over their top probe images
    rules: bool = True  # learn class rules over concept facts (RUN/rules/)
    tally: Path | None = None  # start from an existing NetDissect-Lite tally.csv instead of dissecting


_SECTIONS = {
    "model": {"name": "model", "weights": "weights", "layer": "layer"},
    "probe": {"path": "probe", "categories": "categories", "quantile": "quantile", "preprocess": "preprocess",
              "stability_quantile": "stability_quantile",
              "tally": "tally"},
    "target": {"path": "target", "layout": "layout", "resize": "resize", "crop": "crop", "split_map": "split_map"},
    "rank": {"protocol": "protocol", "ranker": "ranker", "top_local": "top_local", "top_global": "top_global", "min_iou": "min_iou",
             "grid": "grid"},
    "evaluate": {"configs": "configs", "truth": "truth"},
    "run": {"device": "device", "batch_size": "batch_size", "workers": "workers", "seed": "seed", "report": "report",
            "report_max_units": "report_max_units", "rules": "rules"},
}


def load_run_config(path: str | Path) -> RunConfig:
    """Parse a TOML run configuration; unknown sections or keys are errors naming them."""
    path = Path(path)
    if not path.exists():
        raise ConceptrankError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConceptrankError(f"{path}: invalid TOML ({e})") from None
    kw: dict = {}
    base = path.parent
    for key, value in data.items():
        if key == "out":
            _check_type(path, None, "out", value)
            kw["out"] = value
            continue
        if key not in _SECTIONS:
            raise ConceptrankError(f"{path}: unknown section or key {key!r}; expected out, {', '.join(_SECTIONS)}")
        if not isinstance(value, dict):
            raise ConceptrankError(f"{path}: [{key}] must be a table")
        for k, v in value.items():
            if k not in _SECTIONS[key]:
                raise ConceptrankError(f"{path}: unknown key {k!r} in [{key}]; expected {', '.join(_SECTIONS[key])}")
            _check_type(path, key, k, v)
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
    cfg = RunConfig(**{k: v for k, v in kw.items() if k in names})
    validate_run_config(cfg, path)
    return cfg


_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "out": (_STR, "a folder path"), "name": (_STR, "a model name or card path"), "weights": (_STR, "a string"),
    "layer": (_STR, "a layer name"), "path": (_STR, "a path"), "categories": ((str, list), "a list of names"),
    "quantile": (_NUM, "a number in (0, 1)"), "preprocess": (_STR, "'model' or 'netdissect'"),
    "stability_quantile": (_NUM, "a number in (0, 1)"), "tally": (_STR, "a path to tally.csv"),
    "layout": (_STR, "a layout name"), "split_map": (_STR, "a split map such as \"val=train,all=drop\""),
    "resize": (_INT, "a number of pixels"), "crop": (_STR, "'none' or 'person'"),
    "protocol": (_STR, "'standard' or 'paper'"), "ranker": (_STR, "a ranker name"), "top_local": (_INT, "an integer >= 1"),
    "top_global": (_INT, "an integer >= 1"), "min_iou": (_NUM, "a number in [0, 1]"), "grid": (_BOOL, "true or false"),
    "configs": (_STR, "K:G pairs such as \"5:1,10:10\""), "truth": (_STR, "a path to truth.json"),
    "device": (_STR, "auto, cpu or cuda"), "batch_size": (_INT, "an integer >= 1"),
    "workers": (_INT, "an integer >= 0"), "seed": (_INT, "an integer"), "report": (_BOOL, "true or false"),
    "report_max_units": (_INT, "an integer >= 0"), "rules": (_BOOL, "true or false"),
}


def _check_type(path: Path, section: str | None, key: str, value) -> None:
    types, what = _FIELD_TYPES[key]
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and isinstance(value, list):
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        where = f"[{section}] {key}" if section else key
        raise ConfigError(f"{path}: {where} must be {what}, got {value!r} ({type(value).__name__})")


def validate_run_config(cfg: RunConfig, path: str | Path = "config") -> None:
    """Check every stage's settings of ``cfg`` before any stage runs (each stage's ``validate``).

    Raises
    ------
    ConceptrankError
        The first invalid setting, prefixed with ``path``.
    """
    from conceptrank.stages.dissect import DissectConfig
    from conceptrank.stages.evaluate import EvaluateConfig, parse_configs
    from conceptrank.stages.extract import ExtractConfig
    from conceptrank.stages.rank import RankConfig

    checks = [
        lambda: DissectConfig(categories=cfg.categories, quantile=cfg.quantile, preprocess=cfg.preprocess,
                              batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                              stability_quantile=cfg.stability_quantile).validate(),
        lambda: ExtractConfig(layout=cfg.layout, resize=cfg.resize, crop=cfg.crop, batch_size=cfg.batch_size,
                              workers=cfg.workers, device=cfg.device, split_map=cfg.split_map).validate(),
        lambda: RankConfig(protocol=cfg.protocol, top_local=cfg.top_local, top_global=cfg.top_global,
                           min_iou=cfg.min_iou, categories=cfg.categories, seed=cfg.seed, grid=cfg.grid).validate(),
        lambda: EvaluateConfig(configs=cfg.configs, truth=cfg.truth, seed=cfg.seed).validate(),
        lambda: parse_configs(cfg.configs),
    ]
    if cfg.report_max_units is not None and cfg.report_max_units < 0:
        raise ConfigError(f"{path}: [run] report_max_units must be >= 0, got {cfg.report_max_units}")
    for check in checks:
        try:
            check()
        except ConceptrankError as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class PipelineResult:
    out: Path
    dissect: object | None
    extract: object
    rank: object
    evaluate: object
    report: Path | None
    timings: dict = field(default_factory=dict)
    rules: object | None = None


def run_pipeline(cfg: RunConfig, echo: Callable[[str], None] = print) -> PipelineResult:
    """dissect → extract → rank → evaluate (→ report) as the config says; returns every stage's result."""
    from conceptrank.nn.models import load_model
    from conceptrank.stages.dissect import DissectConfig
    from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate
    from conceptrank.stages.extract import ExtractConfig, run_extract
    from conceptrank.stages.rank import RankConfig, run_rank

    validate_run_config(cfg)  # a bad setting of a later stage fails before the first one runs
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    model = load_model(cfg.model, cfg.weights)
    from dataclasses import asdict

    from conceptrank.io.cache import atomic_write_json

    atomic_write_json(out / "run.json", {"config": asdict(cfg), "model": model.describe()})

    t0 = time.perf_counter()
    dres = None
    if cfg.tally is not None:
        tally = Path(cfg.tally)
        echo(f"[dissect] using existing tally {tally}")
    else:
        from conceptrank.io.broden import BrodenDataset
        from conceptrank.stages.dissect import run_dissect

        dcfg = DissectConfig(categories=cfg.categories, quantile=cfg.quantile, preprocess=cfg.preprocess,
                             batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                             stability_quantile=cfg.stability_quantile)
        (dres,) = run_dissect(model, None, cfg.layer, BrodenDataset(cfg.probe, cfg.categories), out / "dissect", dcfg)
        tally = out / "dissect" / "tally.csv"
        echo(dres.summary())
        _probe_activations_if_needed(cfg, model, out / "dissect", echo)
    timings["dissect"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ecfg = ExtractConfig(layout=cfg.layout, resize=cfg.resize, crop=cfg.crop, batch_size=cfg.batch_size,
                         workers=cfg.workers, device=cfg.device, split_map=cfg.split_map)
    eres = run_extract(model, cfg.weights, cfg.layer, cfg.target, out / "extract", ecfg)
    echo(eres.summary())
    timings["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rcfg = RankConfig(protocol=cfg.protocol, top_local=cfg.top_local, top_global=cfg.top_global, min_iou=cfg.min_iou,
                      categories=cfg.categories, seed=cfg.seed, grid=cfg.grid, ranker=cfg.ranker)
    rres = run_rank(out / "extract", tally, out / "rank", rcfg)
    echo(rres.summary())
    timings["rank"] = time.perf_counter() - t0

    from conceptrank.stages.relate import RelateConfig, kg_of_run

    vcfg = EvaluateConfig(configs=cfg.configs, truth=cfg.truth, seed=cfg.seed)
    relate_cfg = RelateConfig(seed=cfg.seed) if kg_of_run(out) is not None else None  # a synthetic world's KG
    beside = _Background(_beside_rules, out, vcfg, relate_cfg)  # they need only rank's outputs
    rules = _rules(out, cfg, echo, timings) if cfg.rules else None  # before evaluate, which reports its numbers

    computed, related = beside.result()
    t0 = time.perf_counter()
    vres = run_evaluate(out / "rank", out / "rank", vcfg, computed=computed)
    echo(vres.table())
    timings["evaluate"] = time.perf_counter() - t0 + beside.seconds_of["evaluate"]
    if isinstance(related, ConceptrankError):
        raise related
    if related is not None:
        echo(related.summary())
        timings["relate"] = beside.seconds_of["relate"]

    report = None
    if cfg.report:
        from conceptrank.report import ReportOptions, write_report

        t0 = time.perf_counter()
        report = write_report(out, ReportOptions(max_units=cfg.report_max_units, seed=cfg.seed))
        timings["report"] = time.perf_counter() - t0
        echo(f"report: {Path(report).resolve()}")
    return PipelineResult(out, dres, eres, rres, vres, report, timings, rules)


def _beside_rules(out: Path, vcfg, relate_cfg, seconds: dict) -> tuple:
    """The evaluation's computation and the relations (None without a KG, the error when relate failed),
    while the rules are learned."""
    from conceptrank.stages.evaluate import compute_evaluation
    from conceptrank.stages.relate import run_relate

    t0 = time.perf_counter()
    related = None
    if relate_cfg is not None:
        from conceptrank.report import ReportOptions
        from conceptrank.report.relations import draw_class_graphs

        try:
            related = run_relate(out, relate_cfg)
            draw_class_graphs(out, ReportOptions().dpi)  # the report's relation graphs, drawn while rules run
        except ConceptrankError as e:  # raised after the evaluation is written, as when relate ran after it
            related = e
    seconds["relate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    computed = compute_evaluation(out / "rank", vcfg)
    seconds["evaluate"] = time.perf_counter() - t0
    return computed, related


class _Background:
    """``fn(*args, seconds)`` in a thread, started now; :meth:`result` waits for it and re-raises its
    exception; ``fn`` records in the dict ``seconds`` how long its parts took.

    For stages whose work is mostly torch, numpy and liblinear (which release the GIL) beside one
    whose work is in worker processes: both keep the cores busy.
    """

    def __init__(self, fn: Callable, *args) -> None:
        import threading

        self.seconds_of: dict = {}
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args, self.seconds_of)
        except BaseException as e:  # re-raised by result(), in the caller's thread
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _rules(out: Path, cfg: RunConfig, echo: Callable[[str], None], timings: dict):
    """Class rules and their comparison table; NeSyFOLD facts alone when there are no dissection thresholds."""
    from conceptrank.errors import RulesError
    from conceptrank.stages.rules import RulesConfig, run_rules

    t0 = time.perf_counter()
    has_thresholds = (out / "dissect" / "thresholds.npy").is_file()
    kw = {"seed": cfg.seed, "min_iou": cfg.min_iou if cfg.min_iou is not None else 0.04, "jobs": 0}
    rcfg = RulesConfig(**kw) if has_thresholds else RulesConfig(**kw, facts="nesyfold", compare=False)
    try:
        res = run_rules(out, rcfg, cfg.truth)
    except RulesError as e:  # e.g. no unit labelled at this IoU: the run stands without rules, and says so
        echo(f"[rules] no rules learned: {e}")
        timings["rules"] = time.perf_counter() - t0
        return None
    echo(res.table() + ("" if has_thresholds else "\n(no dissection thresholds: NeSyFOLD facts only)"))
    timings["rules"] = time.perf_counter() - t0
    return res


def run_from_config(path: str | Path, echo: Callable[[str], None] = print) -> PipelineResult:
    return run_pipeline(load_run_config(path), echo)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             echo: Callable[[str], None] = print) -> PipelineResult:
    """Generate the synthetic world (unless already there for these parameters) and run every stage."""
    from conceptrank.synthetic.build import build_world

    out = Path(out)
    t0 = time.perf_counter()
    params = dict(seed=seed, size=64, probe_images=160 if quick else 1200,
                  images_per_class=20 if quick else 80)
    world = out / "world"
    if _world_is_current(out, params):
        echo(f"[synth] reusing the synthetic world in {world} (same parameters, files unchanged)")
    else:
        echo(f"[synth] synthetic concept world -> {world}")
        _world_manifest(out).unlink(missing_ok=True)
        info = build_world(world, model="auto", progress=not quick, echo=echo, **params)
        echo(info.summary())
        _write_world_manifest(out, params)
    cfg = RunConfig(
        out=out, model=str(world / "model"), layer="layer4", probe=world / "probe", target=world / "target",
        truth=world / "truth.json", seed=seed, workers=0 if quick else 2, batch_size=64,
    )
    res = run_pipeline(cfg, echo)
    echo(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return res


# The world manifest lives next to world/, not in it: generate_world refuses to overwrite a folder
# holding anything but a world.
def _world_manifest(out: Path) -> Path:
    return Path(out) / ".world.json"


def _generator_fingerprint() -> str:
    """Hash of the code that generates the world: a changed generator never reuses an old world."""
    import hashlib

    from conceptrank.nn import nets
    from conceptrank.synthetic import backgrounds, build, drawing, knowledge, train, world

    h = hashlib.sha256()
    for mod in (world, backgrounds, drawing, train, build, knowledge, nets):
        h.update(Path(mod.__file__).read_bytes())
    for name in ("model.json", "weights.safetensors"):  # the shipped model
        f = build.SHIPPED_MODEL_DIR / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()


def _world_key(params: dict) -> str:
    from conceptrank.io import cache

    return cache.stage_key("synth", {"generator": _generator_fingerprint()}, {**params, "train_model": True})


def _world_is_current(out: Path, params: dict) -> bool:
    from conceptrank.io import cache

    m = cache.Manifest.read(_world_manifest(out))
    world = Path(out) / "world"
    return (m is not None and m.key == _world_key(params) and m.section.get("format") == cache.CACHE_FORMAT
            and world.is_dir() and m.data.get("files") == cache.tree_fingerprint(world))


def _write_world_manifest(out: Path, params: dict) -> None:
    from conceptrank.io import cache

    world = Path(out) / "world"
    cache.atomic_write_json(_world_manifest(out), {
        "stage": "synth",
        "world": str(world),
        "params": params,
        "files": cache.tree_fingerprint(world),  # size and mtime of every file: any change regenerates
        "cache": {"format": cache.CACHE_FORMAT, "stage": "synth", "key": _world_key(params), "params": params,
                  "package_versions": cache.package_versions()},
    })


def _probe_activations_if_needed(cfg: RunConfig, model, dissect_dir: Path, echo: Callable[[str], None]) -> None:
    """probe_activations.npz beside the tally when the run's ranker learns from the probe set."""
    from conceptrank.core.rankers import ranker_needs, resolve_ranker
    from conceptrank.stages.probe import run_probe_activations

    name, _ = resolve_ranker(cfg.protocol, cfg.ranker, ("max", "thresholds", "probe"))
    if "probe" in ranker_needs(name):
        path = run_probe_activations(model, cfg.layer, cfg.probe, dissect_dir, batch_size=cfg.batch_size,
                                     workers=cfg.workers, device=cfg.device)
        echo(f"[probe] per-image probe activations for the {name} ranker → {path}")


# -- the ranker benchmark's worlds (issue 13): generated here, above the synthetic layer ------------


def run_ranker_benchmark(out: str | Path, cfg=None, echo: Callable[[str], None] = print):
    """``conceptrank benchmark-rankers``: generate (or reuse) one world per seed and the source model,
    then :func:`conceptrank.stages.benchmark.run_benchmark` on them."""
    from conceptrank.stages.benchmark import BenchmarkConfig, run_benchmark

    cfg = cfg or BenchmarkConfig()
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _benchmark_model(out, cfg, echo)
    worlds = [(seed, _benchmark_world(out, seed, cfg, echo)) for seed in cfg.seeds]
    return run_benchmark(out, worlds, model, cfg, echo)


def _benchmark_world_params(cfg, seed: int) -> dict:
    params = {"seed": int(seed)}
    for name in ("size", "probe_images", "images_per_class"):
        if getattr(cfg, name) is not None:
            params[name] = int(getattr(cfg, name))
    return params


def _benchmark_world(root: Path, seed: int, cfg, echo: Callable[[str], None]) -> Path:
    """``root/seed<N>/world`` generated without a model, unless one with the same parameters and generator is there."""
    from conceptrank.io.cache import atomic_write_json, read_json
    from conceptrank.synthetic.world import generate_world

    folder = root / f"seed{seed}"
    marker = folder / "world.json"
    want = {"params": _benchmark_world_params(cfg, seed), "generator": _generator_fingerprint()}
    try:
        if read_json(marker) == want and (folder / "world" / "truth.json").is_file():
            return folder / "world"
    except (OSError, ValueError):
        pass
    marker.unlink(missing_ok=True)
    echo(f"[world] seed {seed}: generating the probe and target sets")
    generate_world(folder / "world", progress=False, **want["params"])
    atomic_write_json(marker, want)
    return folder / "world"


def _benchmark_model(root: Path, cfg, echo: Callable[[str], None]) -> str:
    """``cfg.model``; else the shipped source model when it fits the worlds' image size; else one trained
    once (seed 0) into ``root/model`` and reused.

    The source task is the same for every world seed (other random images of the same task), so one
    model serves all worlds.
    """
    import inspect

    from conceptrank.synthetic.build import SHIPPED_MODEL_DIR, shipped_model_fits
    from conceptrank.synthetic.world import generate_world

    if cfg.model is not None:
        return str(cfg.model)
    size = int(cfg.size) if cfg.size is not None else int(inspect.signature(generate_world).parameters["size"].default)
    fits, why = shipped_model_fits(size)
    if fits:
        echo(f"[model] the shipped source model ({SHIPPED_MODEL_DIR})")
        return str(SHIPPED_MODEL_DIR)
    card = root / "model"
    if not (card / "model.json").is_file():
        from conceptrank.synthetic.train import train_source_model

        echo(f"[model] {why}: training the source model once (seed 0, {size} px) into {card}")
        train_source_model(card, seed=0, size=size, progress=False)
    return str(card)
