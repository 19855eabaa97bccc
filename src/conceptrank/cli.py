"""The ``conceptrank`` command line: thin Typer commands over the library's functions.

Heavy imports (torch, sklearn, matplotlib) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

_TYPE_WORDS = {"str": "TEXT", "int": "INT", "float": "FLOAT", "path": "PATH", "bool": ""}


def _plain_metavar(param: Any, ctx: Any) -> str:
    """``<list[str]>`` → ``TEXT``, ``<int>`` → ``INT``; flags get none (Typer's rich help shows ``<bool>``)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    label = param.display_type(ctx).strip("<>")
    inner = re.fullmatch(r"list\[(.*)\]", label)
    label = inner.group(1) if inner else label
    return _TYPE_WORDS.get(label, label.upper())


class _Argument(TyperArgument):
    """An argument whose metavar says it all: no ``<list[str]>`` type column in the rich help."""

    def display_type_rich(self, ctx):
        return None


def _tidy(params: list, ctx: Any) -> list:
    for p in params:
        if isinstance(p, TyperArgument):
            p.__class__ = _Argument
            if p.metavar is None:
                p.metavar = p.name.upper()
        elif p.metavar is None:
            p.metavar = _plain_metavar(p, ctx)
    return params


class _Command(TyperCommand):
    """A Typer command whose help shows plain metavars (``PATH``, ``INT``) and no brace usage."""

    def get_params(self, ctx):
        return _tidy(super().get_params(ctx), ctx)

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name != "argument":
                continue
            name = p.metavar + ("..." if p.nargs != 1 else "")
            pieces.append(name if p.required else f"[{name}]")
        return pieces


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _tidy(super().get_params(ctx), ctx)


class _App(typer.Typer):
    """Every ``@app.command()`` gets :class:`_Command` (so commands added later are tidy too)."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Explain what a CNN has learned with ranked, human-readable concepts "
    "(Network Dissection → local and global concept rankings → agreement).",
)

_WEIGHTS_HELP = ("For a torchvision model (required): a weights enum (DEFAULT, IMAGENET1K_V1), a state_dict "
                 "file, or 'none' for random init. For a model card: optional override of its weights file.")
_MODEL_HELP = "Model card (model.json or its folder) or a torchvision model name (e.g. resnet18)."
_DEVICE_HELP = "auto (CUDA if available), cpu or cuda."


def _version(value: bool) -> None:
    if value:
        from conceptrank import __version__

        typer.echo(f"conceptrank {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars or progress lines (same as CONCEPTRANK_QUIET=1)."),
) -> None:
    from conceptrank.progress import set_quiet

    if quiet:
        set_quiet(True)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: printed as one clear line, no traceback."""
    from conceptrank.errors import user_error_types

    return user_error_types()


def _user_paths(args, kwargs) -> list[Path]:
    return [Path(a).absolute() for a in (*args, *kwargs.values()) if isinstance(a, Path)]


def _os_error_line(e: OSError, paths: list[Path]) -> str | None:
    """One line for an OSError that is the environment's or the user's doing, else None (a bug).

    A full disk, a read-only file system or a missing permission is never a bug; any other OSError
    counts as the user's only when it names a file at or below a path given on the command line.
    """
    import errno

    name = Path(os.fsdecode(e.filename)).absolute() if e.filename else None
    env = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
    given = name is not None and any(name == p or p in name.parents for p in paths)
    if not (env or given):
        return None
    return f"{e.filename if e.filename else 'a file'}: {e.strerror or e}"


VERIFY_CONTENT_HELP = ("Fingerprint every input file by its bytes for the cache key (default: bytes when the "
                       "inputs total at most 256 MiB, else size + modification time).")


def _verify_content(on: bool) -> None:
    if on:
        os.environ["CONCEPTRANK_VERIFY_CONTENT"] = "1"  # read by io.cache.files_fingerprint


def _if_dir(path: Path) -> Path | None:
    """``path`` when it is a folder (to lock), else None: a missing run folder is not created."""
    return path if path.is_dir() else None


def _run(fn, *args, _lock: Path | None = None, **kwargs):
    """Call ``fn``; input, configuration and environment errors become one line and exit code 2.

    ``_lock`` names the output folder this command writes: it is held (``io.cache.folder_lock``) for
    the whole call, so a second command writing the same folder stops at once naming this one's pid.
    """
    import contextlib

    from conceptrank.io import cache

    try:
        cache.checkpoint_seconds()  # a bad CONCEPTRANK_CHECKPOINT_SECONDS fails before any work
        with cache.folder_lock(_lock) if _lock is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)
    except _user_errors() as e:  # noqa: B030 - tuple computed lazily
        _fail(str(e))
    except OSError as e:
        line = _os_error_line(e, _user_paths(args, kwargs) + ([Path(_lock).absolute()] if _lock else []))
        if line is None:
            raise
        _fail(line)
    except MemoryError:
        _fail("out of memory: lower --batch-size (or --resize), or use a machine with more memory")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write the synthetic world into."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives identical files."),
    size: int = typer.Option(64, help="Image side in pixels (segmentations are half of it)."),
    probe_images: int = typer.Option(1200, "--probe-images", help="Images in the Broden-format probe set."),
    images_per_class: int = typer.Option(80, "--images-per-class", help="Target images per class (half train, half test)."),
    no_model: bool = typer.Option(False, "--no-model", help="Write no source model."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the source model here even when the shipped one fits (minutes)."),
    ship_model: bool = typer.Option(False, "--ship-model", help="With --retrain: install the trained model as the package's shipped model (what `make model` does)."),
) -> None:
    """Generate the synthetic concept world: Broden probe set, Stanford-40 target set, truth, model.

    The source model is the one shipped with conceptrank when it fits the world (same image size and
    renderer), and trained here otherwise.
    """
    from conceptrank.synthetic.build import build_world
    from conceptrank.synthetic.build import ship_model as install

    if ship_model and not retrain:
        _fail("--ship-model needs --retrain (it installs the model trained by this run)")
    info = _run(
        build_world, out, seed=seed, size=size, probe_images=probe_images, images_per_class=images_per_class,
        model="none" if no_model else ("retrain" if retrain else "auto"), echo=typer.echo,
    )
    typer.echo(info.summary())
    if ship_model and info.model_dir is not None:
        typer.echo(f"shipped model installed in {install(info.model_dir)}")


@app.command()
def layers(
    model: str = typer.Option(..., "--model", metavar="MODEL", help=_MODEL_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="WEIGHTS", help=_WEIGHTS_HELP),
    size: Optional[int] = typer.Option(None, "--size", metavar="PX", help="Sample input of PX×PX pixels (default: the model's input size)."),
) -> None:
    """List every hookable layer's dotted name and output shape for a sample input."""
    from conceptrank.nn.models import list_layers, load_model

    m = _run(load_model, model, weights)
    h, w = (size, size) if size else tuple(m.input_size)
    rows = _run(list_layers, m, (h, w))
    width = max([len(r[0]) for r in rows] + [len("layer")])
    typer.echo(f"{m.name} (weights: {m.weights}), output shapes for one 1x3x{h}x{w} input"
               + ("" if size else " (the model's input size; --size to change)") + ":")
    typer.echo(f"{'layer':<{width}}  {'type':<20}  output shape")
    for name, cls, shape in rows:
        typer.echo(f"{name:<{width}}  {cls:<20}  {'x'.join(map(str, shape)) if shape else '(not reached)'}")


@app.command()
def dissect(
    model: str = typer.Option(..., "--model", metavar="MODEL", help=_MODEL_HELP),
    layer: List[str] = typer.Option(..., "--layer", metavar="NAME", help="Layer dotted name (see `conceptrank layers`); repeat for several layers."),
    probe: Path = typer.Option(..., "--probe", help="Broden-format probe set folder."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder (tally.csv, thresholds.npy, dissect.json)."),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="WEIGHTS", help=_WEIGHTS_HELP),
    categories: Optional[str] = typer.Option(None, "--categories", help="Comma-separated; default: all in category.csv."),
    quantile: float = typer.Option(0.005, "--quantile", help="Top activation quantile that defines a unit's mask."),
    iou_threshold: float = typer.Option(0.04, "--iou-threshold", help="IoU above which a unit counts as a detector."),
    preprocess: str = typer.Option("model", "--preprocess", help="'model' (the weights' transforms) or 'netdissect' (Caffe style)."),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="Reuse per-unit thresholds from a .npy file."),
    batch_size: int = typer.Option(64, "--batch-size", help="Probe images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    store: str = typer.Option("float32", "--store", help="Dtype of the on-disk feature cache between passes: float32 or float16."),
    stability_quantile: Optional[float] = typer.Option(None, "--stability-quantile", help="Also label units at this quantile (e.g. 0.01) and report label stability."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (Ray actors over shards of the probe set)."),
    ray_address: str = typer.Option("auto", "--ray-address", help="With --engine ray: auto (a running cluster), local (start one here) or an address."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="With --engine ray: actors to start (default: one per GPU, else one per 2 CPUs)."),
    verify_content: bool = typer.Option(False, "--verify-content", help=VERIFY_CONTENT_HELP),
) -> None:
    """Network Dissection: label every unit of a layer with its best concept (NetDissect-Lite tally.csv)."""
    from conceptrank.stages.dissect import DissectConfig, run_dissect

    _verify_content(verify_content)

    cfg = DissectConfig(
        categories=tuple(c.strip() for c in categories.split(",")) if categories else None,
        quantile=quantile, iou_threshold=iou_threshold, preprocess=preprocess,
        batch_size=batch_size, workers=workers, device=device, store=store, stability_quantile=stability_quantile,
        engine=engine, ray_address=ray_address, ray_workers=ray_workers,
    )
    _run(cfg.validate)  # every option checked before the model is loaded
    results = _run(run_dissect, model, weights, list(layer), probe, out, cfg, thresholds, _lock=out)
    for r in results:
        typer.echo(r.summary())


@app.command()
def extract(
    model: str = typer.Option(..., "--model", metavar="MODEL", help=_MODEL_HELP),
    layer: str = typer.Option(..., "--layer", metavar="NAME", help="Layer dotted name (see `conceptrank layers`)."),
    dataset: Path = typer.Option(..., "--dataset", help="Stanford 40 folder, image folder, or CSV manifest."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder (activations.npz, extract.json)."),
    weights: Optional[str] = typer.Option(None, "--weights", metavar="WEIGHTS", help=_WEIGHTS_HELP),
    layout: str = typer.Option("auto", "--layout", help="auto, stanford40, imagefolder or manifest."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Resize images to PX×PX (default: the model's input size)."),
    crop: str = typer.Option("none", "--crop", help="'none' or 'person' (Stanford 40 XMLAnnotations box)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Target images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes (0: load in the main process)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    split_map: str = typer.Option("", "--split-map", help="Map other split names explicitly: e.g. 'val=train,all=drop' (targets: train, test, all, drop)."),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (Ray actors over shards of the images)."),
    ray_address: str = typer.Option("auto", "--ray-address", help="With --engine ray: auto (a running cluster), local (start one here) or an address."),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="With --engine ray: actors to start (default: one per GPU, else one per 2 CPUs)."),
    verify_content: bool = typer.Option(False, "--verify-content", help=VERIFY_CONTENT_HELP),
) -> None:
    """Per image and unit: mean and max of the layer's activation map (activations.npz)."""
    from conceptrank.stages.extract import ExtractConfig, run_extract

    _verify_content(verify_content)

    cfg = ExtractConfig(layout=layout, resize=resize, crop=crop, batch_size=batch_size, workers=workers, device=device,
                        split_map=split_map, engine=engine, ray_address=ray_address,
                        ray_workers=ray_workers)
    _run(cfg.validate)
    res = _run(run_extract, model, weights, layer, dataset, out, cfg, _lock=out)
    typer.echo(res.summary())


@app.command()
def rank(
    activations: Path = typer.Option(..., "--activations", help="Output folder of `extract` (or its activations.npz)."),
    tally: Path = typer.Option(..., "--tally", help="A NetDissect-Lite tally.csv (ours or an existing one)."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder (local/global concept CSVs, svm.npz, classifier.json)."),
    protocol: str = typer.Option("standard", "--protocol", help="standard (sound) or paper (the published code's quirks)."),
    top_local: int = typer.Option(10, "--top-local", help="Local concepts kept per image."),
    top_global: int = typer.Option(10, "--top-global", help="Global concepts kept per class (for and against)."),
    min_iou: Optional[float] = typer.Option(None, "--min-iou", help="IoU a unit's label needs to count as a concept (default: 0.04 standard, 0 paper).", metavar="IOU"),
    categories: Optional[str] = typer.Option(None, "--categories", help="Comma-separated categories whose labels count."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/test split and the SVM."),
    grid: bool = typer.Option(False, "--grid", help="paper protocol: grid-search C instead of C=0.001."),
    ranker: Optional[str] = typer.Option(None, "--ranker", help="paper, aggregate, presence, contribution, net2vec, ibd or tcav (default: net2vec for standard when probe_activations.npz is beside the tally, else paper; see README 'Rankers')."),
) -> None:
    """Local (per image) and global (per class, linear SVM) concept rankings."""
    from conceptrank.stages.rank import RankConfig, run_rank

    cfg = RankConfig(
        protocol=protocol, top_local=top_local, top_global=top_global, min_iou=min_iou,
        categories=tuple(c.strip() for c in categories.split(",")) if categories else None,
        seed=seed, grid=grid, ranker=ranker,
    )
    _run(cfg.validate)
    res = _run(run_rank, activations, tally, out, cfg, _lock=out)
    typer.echo(res.summary())


@app.command()
def evaluate(
    ranking: Path = typer.Option(..., "--ranking", help="Output folder of `rank`."),
    configs: str = typer.Option("5:1,5:5,5:10,10:10", "--configs", help="K:G pairs (K local, G global concepts)."),
    split: Optional[str] = typer.Option(None, "--split", help="test, train or all (default: test; all for the paper protocol)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Default: the ranking folder."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="truth.json of a synthetic world (ground-truth scores)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutations, random draws and bootstrap."),
    permutations: int = typer.Option(1000, "--permutations", help="Permutations / random draws / bootstrap replicates of the chance baselines."),
    faithfulness: bool = typer.Option(True, "--faithfulness/--no-faithfulness", help="Deletion test and stability refits (needs activations, tally, svm.npz)."),
) -> None:
    """Agreement between local and global concepts per class (the paper's Formula 2), and more."""
    from conceptrank.stages.evaluate import EvaluateConfig, run_evaluate

    cfg = EvaluateConfig(configs=configs, split=split, truth=truth, seed=seed, n_perm=permutations,
                         n_draw=permutations, n_boot=permutations, faithfulness=faithfulness)
    _run(cfg.validate)
    res = _run(run_evaluate, ranking, out, cfg, _lock=out or ranking)
    typer.echo(res.table())


@app.command()
def rules(
    run: Path = typer.Option(..., "--run", help="A run folder made by `demo` or `run` (dissect, extract, rank)."),
    learner: str = typer.Option("ripper", "--learner", help="ripper (wittgenstein), skope (imodels) or tree (sklearn)."),
    facts: str = typer.Option("share", "--facts", help="share (dissection thresholds) or nesyfold (filter L2 norms)."),
    max_literals: int = typer.Option(3, "--max-literals", help="Literals per rule at most."),
    max_rules: int = typer.Option(5, "--max-rules", help="Rules per class at most."),
    min_share: Optional[float] = typer.Option(None, "--min-share", help="Share of a unit's map above threshold for a fact (default: by CV on train)."),
    min_iou: float = typer.Option(0.04, "--min-iou", help="IoU for a unit to name its concept."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also learn every learner x binarisation x label set."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="truth.json (default: the run's) for the planted-concept precision."),
    seed: int = typer.Option(0, "--seed", help="Seed of the learners and of the CV folds."),
    jobs: int = typer.Option(0, "--jobs", help="Worker processes for the independent fits (0: one per core); results do not depend on it."),
) -> None:
    """Class rules over concept facts (RUN/rules/: rules.txt, rules.lp for clingo, rules.json), scored on test."""
    from conceptrank.stages.rules import RulesConfig, run_rules

    cfg = RulesConfig(learner=learner, facts=facts, max_literals=max_literals, max_rules=max_rules,
                      min_share=min_share, min_iou=min_iou, compare=compare, seed=seed, jobs=jobs)
    res = _run(run_rules, run, cfg, truth)
    typer.echo(res.summary())


@app.command()
def report(
    run: Path = typer.Option(..., "--run", help="A run folder made by `demo` or `run`."),
    max_units: Optional[int] = typer.Option(None, "--max-units", help="Draw unit cards for at most this many units (best IoU first)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the sampled image panels."),
) -> None:
    """Write DIR/report.html and DIR/figures/*.png."""
    from conceptrank.report import ReportOptions, write_report

    path = _run(write_report, run, ReportOptions(max_units=max_units, seed=seed), _lock=_if_dir(run))
    typer.echo(f"report: {path}")


@app.command()
def explain(
    run: Path = typer.Option(..., "--run", metavar="DIR", help="A run folder made by `demo` or `run`."),
    images: List[str] = typer.Argument(..., metavar="IMAGE", help="Image paths relative to the dataset root, or file names that match one image."),
) -> None:
    """Why did the classifier decide as it did for these images: concept contributions to the SVM score."""
    from conceptrank.stages.explain import run_explain

    res = _run(run_explain, run, images, _lock=_if_dir(run))
    typer.echo(res.text())


@app.command()
def relate(
    run: Path = typer.Option(..., "--run", help="A run folder made by `demo` or `run`."),
    kg: Optional[Path] = typer.Option(None, "--kg", help="Knowledge graph: ConceptNet assertions .csv.gz, KGTK .tsv, a WordNet folder (/usr/share/wordnet), or a folder holding one (default: the synthetic world's knowledge.csv.gz)."),
    kg_format: str = typer.Option("auto", "--kg-format", help="auto, conceptnet, kgtk or wordnet."),
    concept_map: Optional[Path] = typer.Option(None, "--concept-map", help="CSV concept,term overriding the concept-name normalisation (an empty term leaves a concept unmapped)."),
    top_global: Optional[int] = typer.Option(None, "--top-global", help="G global concepts per class (default: as ranked)."),
    top_local: Optional[int] = typer.Option(None, "--top-local", help="K local concepts per image (default: as ranked)."),
    split: str = typer.Option("test", "--split", help="Images used for grounding: test, train or all."),
    min_support: float = typer.Option(0.3, "--min-support", help="Share of a class's images a relation must fit in to count as grounded."),
    seed: int = typer.Option(0, "--seed", help="Seed of the degree-matched chance baseline."),
) -> None:
    """KG relations among the ranked concepts, grounded in the model's own activation maps (relations.csv/json)."""
    from conceptrank.stages.relate import RelateConfig, run_relate

    cfg = _run(RelateConfig, kg=kg, kg_format=kg_format, overrides=concept_map, top_global=top_global,
               top_local=top_local, split=split, min_support=min_support, seed=seed)
    res = _run(run_relate, run, cfg)
    typer.echo(res.summary())


@app.command()
def fetch(
    dataset: str = typer.Argument(..., metavar="DATASET", help="What to download: broden, stanford40 or conceptnet."),
    to: Path = typer.Option(..., "--to", help="Folder to download and extract into."),
    variant: str = typer.Option("224", "--variant", help="Broden only: 224 (broden1_224) or 227 (broden1_227)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Mirror to download from instead of the official address."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the server before failing."),
) -> None:
    """Download a dataset (resumable, checksummed, extracted); offline it fails fast with manual steps."""
    from conceptrank.fetch import fetch_dataset

    res = _run(fetch_dataset, dataset, to, variant=variant, base_url=base_url, timeout=timeout)
    typer.echo(res.summary())


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder."),
    quick: bool = typer.Option(False, "--quick", help="A tiny world for tests (seconds)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the model and every stage."),
) -> None:
    """synth → dissect → extract → rank → evaluate → report on the synthetic world; prints a summary."""
    from conceptrank.pipeline import run_demo

    _run(run_demo, out, quick=quick, seed=seed, echo=typer.echo, _lock=out)


@app.command("run")
def run_config(config: Path = typer.Argument(..., metavar="CONFIG", help="A TOML run configuration (see examples/).")) -> None:
    """Run the stages described by a TOML config file (real models and data)."""
    from conceptrank.pipeline import load_run_config, run_pipeline

    cfg = _run(load_run_config, config)
    _run(run_pipeline, cfg, echo=typer.echo, _lock=cfg.out)


@app.command("probe-activations")
def probe_activations_cmd(
    model: str = typer.Option(..., "--model", help="Model card folder or torchvision name (as for dissect)."),
    layer: str = typer.Option(..., "--layer", help="The dissected layer."),
    probe: Path = typer.Option(..., "--probe", help="The Broden-format probe set that was dissected."),
    out: Path = typer.Option(..., "--out", help="Folder to write probe_activations.npz into (the dissect folder, beside tally.csv)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights for a torchvision model (as for dissect)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Per-image activations and visible concepts of the probe set: what the net2vec/ibd/tcav rankers learn from."""
    from conceptrank.nn.models import load_model
    from conceptrank.stages.probe import run_probe_activations

    loaded = _run(load_model, model, weights)
    path = _run(run_probe_activations, loaded, layer, probe, out, batch_size=batch_size, workers=workers, device=device)
    typer.echo(f"probe activations → {path}")


@app.command("benchmark-rankers")
def benchmark_rankers(
    out: Path = typer.Option(Path("runs/benchmark"), "--out", help="Folder for the worlds, their stages and benchmark.csv/json/png."),
    seeds: str = typer.Option("1,2,3", "--seeds", help="Comma-separated world seeds (the demo uses 0)."),
    rankers: Optional[str] = typer.Option(None, "--rankers", help="Comma-separated rankers (default: all)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Source model card folder (default: shipped, else trained once)."),
    size: Optional[int] = typer.Option(None, "--size", help="World image side in pixels (default: the world's)."),
    probe_images: Optional[int] = typer.Option(None, "--probe-images", help="Probe images per world (default: the world's)."),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", help="Target images per class (default: the world's)."),
    k: int = typer.Option(5, "--k", help="Local depth K of P@K and of the agreement."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers of the forward passes."),
) -> None:
    """Every concept ranker on synthetic worlds with known truth, side by side; picks the winner."""
    from conceptrank.core.rankers import RANKERS
    from conceptrank.pipeline import run_ranker_benchmark
    from conceptrank.stages.benchmark import BenchmarkConfig

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        _fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    cfg = BenchmarkConfig(
        seeds=seed_list, rankers=tuple(r.strip() for r in rankers.split(",") if r.strip()) if rankers else RANKERS,
        model=model, size=size, probe_images=probe_images, images_per_class=images_per_class, k=k, workers=workers,
    )
    res = _run(run_ranker_benchmark, out, cfg, echo=typer.echo)
    typer.echo(res.table())
    typer.echo(f"→ {res.out / 'benchmark.csv'}, benchmark.json, benchmark.png ({res.timings['total']:.0f} s)")


def main() -> None:  # entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
