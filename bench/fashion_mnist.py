"""Fashion-MNIST on 2 CPU cores: the pretraining recipe, the SimCLR paper's ablations, and
the semi-supervised targets.

Every number comes from the pipeline's own stages (``clpipe run fashion_mnist`` with
overrides), run here side by side; the results go to ``bench/results/fashion_*.json``
and the markdown tables in bench/README.md are generated from them.

Subcommands::

    .venv/bin/python bench/fashion_mnist.py recipe     # the sweep that chose the recipe, and old vs new
    .venv/bin/python bench/fashion_mnist.py ablations  # head: none / linear / 3-layer; temperature
    .venv/bin/python bench/fashion_mnist.py targets    # the 2-core chain: 1% and 10% labels, 3 seeds
    .venv/bin/python bench/fashion_mnist.py distill-init --work-dir W  # the student's start, side by side
    .venv/bin/python bench/fashion_mnist.py finetunes --work-dir W base lr:finetune.lr_base=0.03  # teacher vs baseline
    .venv/bin/python bench/fashion_mnist.py pretrain-budget --work-dir W 4 8 16  # the same, per pretraining length

``recipe`` and ``ablations`` use the quick setting of the first look at the data: 8,000
training images (20% of them val, 6,400 trained on), 10 epochs at 28 px, global batch
64 on 2 Ray Train workers, scored on 2,000 of the official test images by kNN (k=20, all
6,400 labels) and a logistic-regression probe on 800 labels (stratified, 100 per class).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import run_of  # noqa: E402
from semi_supervised import machine  # noqa: E402  (one description of the machine for every bench)

RESULTS = Path(__file__).parent / "results"
FASHION = "/usr/share/datasets/fashion-mnist"

# the setting of the first look (issue text): 8,000 images, 10 epochs, global batch 64
QUICK = [
    "data.max_samples=8000",
    "data.val_fraction=0.2",
    "data.max_test_samples=2000",
    "data.samples_per_shard=512",
    "pretrain.epochs=10",
    "pretrain.batch_size_per_worker=32",
    "pretrain.num_workers=2",
    "sweep.enabled=false",
]
# the recipe digits' default.yaml ships (what the first look ran), at Fashion-MNIST's 28 px
DIGITS_RECIPE = [
    "pretrain.views.image_size=28",
    "pretrain.views.crop_min_scale=0.3",
    "pretrain.views.hflip_prob=0.0",
    "pretrain.views.jitter_strength=0.5",
    "pretrain.optimizer=lars",
    "pretrain.lr_base=1.0",
    "pretrain.weight_decay=1.0e-6",
    "pretrain.warmup_epochs=2",
    "pretrain.params.simclr.temperature=0.5",
    "pretrain.params.simclr.head_layers=3",
]


# the small student (about 1/4 of the teacher's parameters) from scratch: SimCLRv2's big-to-small T = 1, LARS;
# 16 epochs: at 4 it ended 2.6 / 5.6 points below its teacher (1% / 10%), at 8 0.3 / 2.6, its 10% val top-1
# still near 0.853 when the cosine schedule ended (fashion_small_student.json, seed 0)
SMALL_STUDENT = [
    "distill.epochs=16",
    "distill.student_width=16",
    "distill.temperature=1.0",
    "distill.init=scratch",
    "distill.optimizer=lars",
    "distill.lr_base=0.5",
]
SMALL_RECIPE_KEYS = ("student_width", "init", "temperature", "optimizer", "lr_base", "epochs", "alpha")


def run(work: str, overrides: list[str], until: str, quiet: bool = True, config: str = "fashion_mnist"):
    from pipelines.cli import run as run_pipeline
    from pipelines.config import load_config

    cfg = load_config(config, [f"work_dir={work}", *overrides])
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        result = run_pipeline(cfg, until=until)
    return result, time.perf_counter() - t0


def probe(result, labels: int = 800, seed: int = 0) -> dict:
    """kNN (all training labels) and a logistic-regression probe on ``labels`` stratified
    training labels, on the test split, for the encoder of ``result``."""
    from cl_core.augment import EvalTransform
    from cl_core.data.reader import load_split
    from cl_core.data.shards import read_manifest, shard_urls
    from cl_core.evaluate import extract_features, knn_top1, linear_probe_top1
    from pipelines.stages._pretraining import load_encoder

    enc = result.stages["pretrain"].outputs
    shard_dir = result.stages["shard"].outputs["shard_dir"]
    manifest = read_manifest(shard_dir)
    tf = EvalTransform(enc["image_size"])
    (tr_x, tr_y), (te_x, te_y) = (load_split(shard_urls(shard_dir, manifest, s)[0], tf) for s in ("train", "test"))
    torch.set_num_threads(2)
    encoder = load_encoder(enc)
    ftr, fte = extract_features(encoder, tr_x), extract_features(encoder, te_x)
    g = torch.Generator().manual_seed(seed)
    classes = int(tr_y.max()) + 1
    pick = torch.cat(
        [
            torch.nonzero(tr_y == c).flatten()[torch.randperm(int((tr_y == c).sum()), generator=g)[: labels // classes]]
            for c in range(classes)
        ]
    )
    return {
        "knn_top1": knn_top1(ftr, tr_y, fte, te_y, k=20, temperature=0.07),
        "probe_top1": linear_probe_top1(ftr[pick], tr_y[pick], fte, te_y),
        "probe_labels": len(pick),
        "train_images": len(tr_y),
        "test_images": len(te_y),
    }


def write(name: str, payload: dict, path: Path | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = path or RESULTS / f"fashion_{name}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}, indent=2))
    print(f"written to {path}")
    return path


def recipe(work: str, space: str, trial_epochs: int, samples: int) -> None:
    """The sweep stage over the recipe on the quick setting (one Tune trial per CPU, each
    a 1-worker pretrain of global batch 64, halving at epochs 2, 4, 8), then the digits
    recipe and the chosen one trained side by side in the same setting and probed."""
    sweep_set = [
        *QUICK,
        *DIGITS_RECIPE,
        "sweep.enabled=true",
        f"sweep.space={space}",
        f"sweep.epochs={trial_epochs}",
        "sweep.grace_period=2",
        "sweep.workers_per_trial=1",
        "sweep.cpus_per_trial=1",
        f"sweep.num_samples={samples}",
    ]
    sw, seconds = run(work, [*sweep_set, "pretrain.batch_size_per_worker=64"], "sweep", quiet=False)
    out = sw.stages["sweep"].outputs
    best = out["best"]
    from pipelines.config import SWEEP_TRAINING_FIELDS, SWEEP_VIEW_FIELDS

    def as_override(k: str, v) -> str:
        if k in SWEEP_TRAINING_FIELDS:
            return f"pretrain.{k}={v}"
        if k in SWEEP_VIEW_FIELDS:
            return f"pretrain.views.{k}={v}"
        return f"pretrain.params.simclr.{k}={v}"

    chosen = [as_override(k, v) for k, v in best.items()]
    rows = {}
    for name, over in (("digits_recipe", DIGITS_RECIPE), ("chosen", [*DIGITS_RECIPE, *chosen])):
        res, secs = run(work, [*QUICK, *over], "pretrain")
        rows[name] = {"overrides": over, "seconds": secs, **probe(res)}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "overrides"}), flush=True)
    write(
        "recipe",
        {
            "setting": QUICK,
            "sweep": {
                "space": space,
                "trial_epochs": trial_epochs,
                "seconds": seconds,
                "best": best,
                "ranked": out["ranked"],
            },
            "runs": rows,
            "gain_probe_points": 100 * (rows["chosen"]["probe_top1"] - rows["digits_recipe"]["probe_top1"]),
        },
    )


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def ablations(work: str, seeds: list[int], temperatures: list[float]) -> None:
    """SimCLR's Figure 8 and its temperature sweep on the quick setting, each over seeds
    (the pipeline's seed: shards' split, initialisation and views): the linear probe for
    a 3-layer (nonlinear) head, a linear head and no head; and for NT-Xent temperatures."""
    from pipelines.config import load_config

    base = load_config("fashion_mnist").pretrain
    t0 = base.params.get("simclr", {}).get("temperature", 0.5)
    cases = {f"head_layers={k}": [f"pretrain.params.simclr.head_layers={k}"] for k in (3, 1, 0)}
    # either side of the shipped value (the recipe sweep already ranked 0.1 below 0.2 and 0.5)
    cases |= {f"temperature={t}": [f"pretrain.params.simclr.temperature={t}"] for t in temperatures if t != t0}
    rows: dict[str, dict] = {}
    for name, over in cases.items():
        runs = []
        for seed in seeds:
            res, secs = run(work, [*QUICK, f"seed={seed}", *over], "pretrain")
            runs.append({"seed": seed, "seconds": secs, **probe(res, seed=seed)})
            print(name, seed, json.dumps(runs[-1]), flush=True)
        rows[name] = {
            "overrides": over,
            "runs": runs,
            "probe_top1": _stats([r["probe_top1"] for r in runs]),
            "knn_top1": _stats([r["knn_top1"] for r in runs]),
        }
    rows[f"temperature={t0}"] = rows["head_layers=3"]  # the shipped temperature with the shipped head
    # the whole pretrain section the runs resolved to (BatchNorm across workers included)
    section = load_config("fashion_mnist", QUICK).pretrain.model_dump(mode="json")
    write("ablations", {"setting": QUICK, "pretrain": section, "seeds": seeds, "rows": rows})


def encoder_probe(result) -> dict:
    """The evaluate stage's all-labels linear probe (its weight decay and iterations) and
    kNN of ``result``'s pretrained encoder, on the val and on the test split, with the
    probe's top-1 on its own training features (how linearly separable they are)."""
    from cl_core.augment import EvalTransform
    from cl_core.data.reader import load_split
    from cl_core.data.shards import read_manifest, shard_urls
    from cl_core.evaluate import extract_features, fit_linear_probe, knn_top1
    from pipelines.config import load_config
    from pipelines.stages._pretraining import load_encoder

    cfg = load_config("fashion_mnist").evaluate
    enc = result.stages["pretrain"].outputs
    shard_dir = result.stages["shard"].outputs["shard_dir"]
    manifest = read_manifest(shard_dir)
    tf = EvalTransform(enc["image_size"])
    torch.set_num_threads(2)
    encoder = load_encoder(enc)
    feats = {}
    for split in ("train", "val", "test"):
        x, y = load_split(shard_urls(shard_dir, manifest, split)[0], tf)
        feats[split] = (extract_features(encoder, x), y)
    ftr, ytr = feats["train"]
    w, b = fit_linear_probe(
        ftr, ytr, int(ytr.max()) + 1, weight_decay=cfg.probe_weight_decay, max_iter=cfg.probe_max_iter
    )
    out: dict = {"feat_dim": int(ftr.shape[1]), "train_images": len(ytr)}
    for split, (f, y) in feats.items():
        out[f"{split}/linear_top1"] = ((f @ w.T + b).argmax(1) == y).float().mean().item()
        if split != "train":
            out[f"{split}/knn_top1"] = knn_top1(ftr, ytr, f, y, k=cfg.knn_k, temperature=cfg.knn_temperature)
    return out


def encoders(work: str, variants: list[str]) -> None:
    """The shipped 2-core config's pretrain stage on all 54,000 training images, once per
    variant (``NAME`` or ``NAME:OVERRIDE,...``; ``shipped`` is the config as it is), each
    with its all-labels probe (:func:`encoder_probe`), its val kNN per epoch and its
    compute time. Merged into ``bench/results/fashion_encoders.json`` variant by variant,
    so a long list can be run in several sittings; a variant is remeasured when named."""
    import mlflow

    from pipelines.config import load_config

    path = RESULTS / "fashion_encoders.json"
    rows: dict[str, dict] = json.loads(path.read_text())["variants"] if path.exists() else {}
    client = mlflow.MlflowClient(tracking_uri=load_config("fashion_mnist", [f"work_dir={work}"]).tracking_uri())
    for spec in variants:
        name, _, over = spec.partition(":")
        overrides = [o for o in over.split(",") if o]
        res, _ = run(work, overrides, "pretrain", quiet=False)
        stage = res.stages["pretrain"]
        timing = stage_seconds(client, stage)
        curve = [m.value for m in client.get_metric_history(stage.run_id, "val/knn_top1")]
        rows[name] = {"overrides": overrides, "pretrain": timing, "val_knn_per_epoch": curve, **encoder_probe(res)}
        print(name, json.dumps(rows[name]), flush=True)
        write("encoders", {"config": "fashion_mnist", "variants": rows}, path)


def targets(
    work: str,
    seeds: list[int],
    config: str = "fashion_mnist",
    extra: list[str] | None = None,
    out: str | None = None,
    small_student: bool = True,
) -> None:
    """The shipped 2-core config end to end (the first seed), then the fine-tune and
    distill stages again with the other seeds on the same shards, labels and encoder,
    and a small student (small_cnn width 16, T = 1) per seed (``small_student=False``:
    none, about 27 minutes less per seed on 2 cores). The JSON is rewritten after every seed, so an
    interrupted run keeps what it measured."""
    name = "targets" if config == "fashion_mnist" else f"targets_{config.removeprefix('fashion_mnist_')}"
    path = Path(out) if out else RESULTS / f"fashion_{name}.json"
    import mlflow

    from pipelines.config import load_config

    extra = extra or []
    cfg = load_config(config, [f"work_dir={work}", *extra])
    dump = cfg.model_dump(mode="json")
    for section in ("finetune", "distill"):
        dump[section].pop("seed")
    # what the results depend on: not where runs are stored, tracked and registered, nor how Ray is
    # reached ("registry": the register section's name before it took the stage's)
    untracked = ("work_dir", "name", "mlflow", "ray", "register", "registry")
    fingerprint = {k: v for k, v in dump.items() if k not in untracked}
    per_seed: dict[str, dict] = json.loads(path.read_text())["per_seed"] if path.exists() else {}
    stale = [
        s
        for s, r in per_seed.items()
        if {k: v for k, v in r.get("config", {}).items() if k not in untracked} != fingerprint
    ]
    if stale:
        print(f"{path}: dropping seeds {stale}: measured with another configuration", flush=True)
        per_seed = {s: r for s, r in per_seed.items() if s not in stale}
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri())

    def seconds(stage) -> dict:
        return stage_seconds(client, stage)

    def curves(result, stage: str, names) -> dict:  # val metric per epoch: where training stood when it stopped
        rid = result.stages[stage].run_id
        return {
            n: [round(m.value, 4) for m in sorted(client.get_metric_history(rid, n), key=lambda m: m.step)]
            for n in names
        }

    for seed in seeds:
        over = [*extra, *([f"finetune.seed={seed}", f"distill.seed={seed}"] if seed else [])]
        load = os.getloadavg()[0]  # > 0.5: something else shared the cores at the start
        res, secs = run(work, over, "evaluate", quiet=False, config=config)
        fr = list(res.stages["distill"].outputs["models"])
        before = per_seed.get(str(seed), {})
        chain = {
            "load_average_at_start": load,
            "seconds": secs,
            "stages": {k: seconds(v) for k, v in res.stages.items()},
        }
        if _same_runs(before.get("stages", {}), chain["stages"]):
            # every stage a cache hit of the runs this record already holds (a rerun for the small
            # student): keep how they were recorded (computed from the start, their wall time)
            chain = {k: before[k] for k in chain}
        small_rec = {}
        if small_student:
            small, small_secs = run(work, [*over, *SMALL_STUDENT], "evaluate", config=config)
            dist = small.stages["distill"].outputs["models"]
            logged = client.get_run(small.stages["distill"].run_id).data.params
            small_rec = {
                "small_rows": small.stages["evaluate"].outputs["rows"],
                "small_seconds": small_secs,
                # its distill and evaluate compute time (from the runs that computed them, when cached)
                "small_stages": {k: seconds(small.stages[k]) for k in ("distill", "evaluate")},
                "small_params": {k: (v.get("params"), v.get("teacher_params")) for k, v in dist.items()},
                # its recipe as the distill run logged it
                "small_recipe": {k: logged.get(k) for k in SMALL_RECIPE_KEYS},
            }
            if _same_runs(before.get("small_stages", {}), small_rec["small_stages"]):
                small_rec["small_seconds"] = before["small_seconds"]
        per_seed[str(seed)] = {
            "config": fingerprint,
            **chain,
            "rows": res.stages["evaluate"].outputs["rows"],
            "metrics": res.stages["evaluate"].outputs["metrics"],
            **small_rec,
            "curves": {
                "pretrain": curves(res, "pretrain", ["val/knn_top1"]),
                "finetune": curves(
                    res, "finetune", [f"{p}_{n.split('_', 1)[1]}/val/top1" for n in fr for p in ("teacher", "baseline")]
                ),
                "distill": curves(res, "distill", [f"{n}/val/top1" for n in fr]),
                **({"small_distill": curves(small, "distill", [f"{n}/val/top1" for n in fr])} if small_student else {}),
            },
        }
        print(seed, json.dumps({k: v for k, v in per_seed[str(seed)].items() if k != "metrics"}), flush=True)
        write(name, summarize(per_seed), path)


def _same_runs(before: dict, now: dict) -> bool:
    """Whether ``now``'s stages (all cache hits) reused exactly the runs ``before`` recorded."""
    return (
        bool(now)
        and before.keys() == now.keys()
        and all(now[k].get("cached") and run_of(now[k]) == run_of(before[k]) for k in now)
    )


def stage_seconds(client, stage) -> dict:
    """A stage's compute time: its own, or for a cache hit the time of the run it reused;
    ``resumed`` when that run continued an interrupted one (its time is then only the rest)."""
    run = client.get_run(stage.run_id)
    out = (
        {"seconds": stage.seconds, "cached": False, "run_id": stage.run_id}
        if not stage.cached
        else {"seconds": run.data.metrics.get("stage/seconds"), "cached": True, "computed_in_run": stage.run_id}
    )
    return {**out, "resumed": _resumed(client, run, stage.outputs)}


def _run_id(timing: dict) -> str:
    """:func:`records.run_of` of a stage's timing, which :func:`stage_seconds` always fills."""
    rid = run_of(timing)
    if rid is None:
        raise SystemExit(f"no MLflow run in the stage record {timing}")
    return rid


def _resumed(client, run, outputs: dict) -> bool:
    """Whether a stage run continued an interrupted run of its cache key from a checkpoint:
    its tag, or (runs from before the tag) a fine-tune/distill run without the first val
    check (step 0) of every model it reports, which a job started afresh logs."""
    from pipelines import tracking

    if tracking.TAG_RESUMED in run.data.tags:
        return True
    models = outputs.get("models")
    return (
        isinstance(models, dict)
        and bool(models)
        and any(
            not any(m.step == 0 for m in client.get_metric_history(run.info.run_id, f"{n}/val/top1")) for n in models
        )
    )


def distill_init(work: str, seed: int, inits: list[str], out: str | None = None) -> None:
    """The distill stage of the shipped 2-core config once per ``distill.init``, side by
    side on one pretrained encoder and one seed's fine-tuned teachers (every upstream stage
    from the cache): each student's test top-1 against its teacher's, its val curve and the
    stage's time. ``out``: another JSON than fashion_distill_init.json (for example small
    students' recipes, ``scratch:student_width=16,...``)."""
    import mlflow

    from pipelines.config import load_config

    client = mlflow.MlflowClient(tracking_uri=load_config("fashion_mnist", [f"work_dir={work}"]).tracking_uri())
    over = [f"finetune.seed={seed}", f"distill.seed={seed}"] if seed else []
    path = Path(out) if out else RESULTS / "fashion_distill_init.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = old.get("runs", {}) if old.get("seed") == seed else {}  # earlier variants on the same teachers stay
    for init in inits:  # INIT or INIT:KEY=VALUE,... (more distill overrides)
        name, _, extra = init.partition(":")
        res, secs = run(
            work, [*over, f"distill.init={name}", *(f"distill.{kv}" for kv in extra.split(",") if kv)], "evaluate"
        )
        st = res.stages["distill"]
        rows = {str(r["label_fraction"]): r for r in res.stages["evaluate"].outputs["rows"]}
        names = list(st.outputs["models"])
        runs[init] = {
            "distill_seconds": stage_seconds(client, st)["seconds"],
            "distill_cached": st.cached,
            "run_id": st.run_id,
            # the recipe as the distill run logged it
            "recipe": {k: client.get_run(st.run_id).data.params.get(k) for k in SMALL_RECIPE_KEYS},
            "rows": {
                f: {
                    "labels": r["labels"],
                    "teacher": r["teacher"],
                    "student": r["student"],
                    "student_minus_teacher": r["student"] - r["teacher"],
                }
                for f, r in rows.items()
            },
            "val_curves": {
                n: [
                    round(m.value, 4)
                    for m in sorted(client.get_metric_history(st.run_id, f"{n}/val/top1"), key=lambda m: m.step)
                ]
                for n in names
            },
        }
        print(init, json.dumps(runs[init]["rows"]), flush=True)
        write("distill_init", {"seed": seed, "runs": runs}, path)


def finetunes(work: str, seed: int, base: list[str], variants: list[str], fraction: float) -> None:
    """The fine-tune stage alone (shards, labels and the pretrained encoder from the cache)
    once per variant (``NAME`` or ``NAME:OVERRIDE,...``, ``finetune.*`` overrides), on one
    label fraction and one seed: the teacher's and the supervised baseline's val top-1 (the
    epoch each selects), where each stood per val check, and the stage's time. Both models
    get the variant, so a knob that helps the baseline as much as the teacher shows as no
    gain. Merged into ``bench/results/fashion_finetunes.json`` variant by variant; a
    record made with another ``base`` or seed is replaced."""
    import mlflow

    from pipelines.config import load_config

    path = RESULTS / "fashion_finetunes.json"
    setting = {"seed": seed, "base": base, "fraction": fraction}
    old = json.loads(path.read_text()) if path.exists() else {}
    rows: dict[str, dict] = old.get("variants", {}) if old.get("setting") == setting else {}
    client = mlflow.MlflowClient(tracking_uri=load_config("fashion_mnist", [f"work_dir={work}"]).tracking_uri())
    fixed = [*base, f"labels.fractions=[{fraction}]", *([f"finetune.seed={seed}"] if seed else [])]
    for spec in variants:
        name, _, over = spec.partition(":")
        overrides = [o for o in over.split(",") if o]
        res, _ = run(work, [*fixed, *overrides], "finetune", quiet=False)
        st = res.stages["finetune"]
        models = st.outputs["models"]
        timing = stage_seconds(client, st)
        run_id = _run_id(timing)
        rows[name] = {
            "overrides": overrides,
            "finetune": timing,
            "from_head_layer": st.outputs["from_head_layer"],
            "val_top1": {n: m["val_top1"] for n, m in models.items()},
            "selected_epoch": {n: m["selected_epoch"] for n, m in models.items()},
            "val_curves": {
                n: [
                    round(m.value, 4)
                    for m in sorted(client.get_metric_history(run_id, f"{n}/val/top1"), key=lambda m: m.step)
                ]
                for n in models
            },
        }
        t = next(v for n, v in rows[name]["val_top1"].items() if n.startswith("teacher"))
        b = next((v for n, v in rows[name]["val_top1"].items() if n.startswith("baseline")), None)
        rows[name]["teacher_minus_baseline"] = None if b is None else t - b
        print(name, json.dumps(rows[name]["val_top1"]), flush=True)
        write("finetunes", {"config": "fashion_mnist", "setting": setting, "variants": rows}, path)


def pretrain_budget(
    work: str, epochs: list[int], seeds: list[int], fraction: float, base: list[str], tag: str | None
) -> None:
    """How the gap between the teacher and its from-scratch baseline on one label fraction
    moves with the pretraining budget: the shipped recipe pretrained for each of ``epochs``
    (one encoder each, its learning-rate schedule stretched to the length), then the
    fine-tune stage on ``fraction`` once per fine-tune seed. Per budget: the encoder's
    compute time and val kNN per epoch; per seed the val top-1 of the teacher and of the
    baseline (the epochs each selects) and of the linear probe the teacher starts from (its
    val check at step 0, ``finetune.head_init: probe`` as shipped).
    ``base`` overrides the encoder's network or recipe for every budget (the baseline
    trains the same network), recorded in the setting; ``tag`` names such a variant's record.
    Merged into ``bench/results/fashion_pretrain_budget_<N>pct[_<tag>].json`` budget by budget."""
    import mlflow

    from pipelines.config import load_config

    if bool(base) != bool(tag):
        sys.exit("pretrain-budget: --base and --tag go together (the variant's overrides and its record's name)")
    path = RESULTS / f"fashion_pretrain_budget_{100 * fraction:g}pct{f'_{tag}' if tag else ''}.json"
    setting: dict[str, Any] = {"fraction": fraction, "seeds": seeds} | ({"base": base} if base else {})
    old = json.loads(path.read_text()) if path.exists() else {}
    rows: dict[str, dict] = old.get("budgets", {}) if old.get("setting") == setting else {}
    client = mlflow.MlflowClient(tracking_uri=load_config("fashion_mnist", [f"work_dir={work}"]).tracking_uri())
    for e in epochs:
        row: dict = {"pretrain_epochs": e, "seeds": {}}
        for seed in seeds:
            over = [
                *base,
                f"pretrain.epochs={e}",
                f"labels.fractions=[{fraction}]",
                *([f"finetune.seed={seed}"] if seed else []),
            ]
            res, _ = run(work, over, "finetune", quiet=False)
            if "pretrain" not in row:
                stage = res.stages["pretrain"]
                row["pretrain"] = stage_seconds(client, stage)
                row["val_knn_per_epoch"] = [
                    round(m.value, 4)
                    for m in sorted(client.get_metric_history(stage.run_id, "val/knn_top1"), key=lambda m: m.step)
                ]
            st = res.stages["finetune"]
            models = st.outputs["models"]
            run_id = _run_id(stage_seconds(client, st))
            teacher = next(n for n in models if n.startswith("teacher"))
            baseline = next(n for n in models if n.startswith("baseline"))
            first = min(client.get_metric_history(run_id, f"{teacher}/val/top1"), key=lambda m: m.step)
            row["seeds"][str(seed)] = {
                "finetune_run": run_id,
                "teacher": models[teacher]["val_top1"],
                "baseline": models[baseline]["val_top1"],
                "probe": first.value,
                "teacher_minus_baseline": models[teacher]["val_top1"] - models[baseline]["val_top1"],
            }
            print(e, seed, json.dumps(row["seeds"][str(seed)]), flush=True)
        per = row["seeds"].values()
        row["summary"] = {
            k: _stats([r[k] for r in per]) for k in ("teacher", "baseline", "probe", "teacher_minus_baseline")
        }
        rows[str(e)] = row
        write(path.stem, {"config": "fashion_mnist", "setting": setting, "budgets": rows}, path)


def summarize(per_seed: dict[str, dict]) -> dict:
    seeds = sorted(per_seed, key=int)
    fractions = sorted({r["label_fraction"] for r in per_seed[seeds[0]]["rows"]})
    table = {}
    for f in fractions:

        def col(key: str, rows: str = "rows", f=f) -> list[float]:
            return [next(r for r in per_seed[s][rows] if r["label_fraction"] == f)[key] for s in seeds]

        t, b, lp, st = col("teacher"), col("baseline"), col("encoder_linear"), col("student")
        table[str(f)] = {
            "labels": col("labels")[0],
            "baseline": _stats(b),
            "teacher": _stats(t),
            "encoder_linear": _stats(lp),
            "student": _stats(st),
            "teacher_minus_baseline": _stats([x - y for x, y in zip(t, b, strict=True)]),
            "teacher_minus_linear": _stats([x - y for x, y in zip(t, lp, strict=True)]),
            "student_minus_teacher": _stats([x - y for x, y in zip(st, t, strict=True)]),
        }
        if all("small_rows" in per_seed[s] for s in seeds):
            sm = col("student", "small_rows")
            table[str(f)] |= {
                "small_student": _stats(sm),
                "small_minus_teacher": _stats([x - y for x, y in zip(sm, t, strict=True)]),
            }
    first = per_seed[seeds[0]]
    return {
        "seeds": [int(s) for s in seeds],
        "per_seed": per_seed,
        "table": table,
        "encoder_linear_all_labels": first["metrics"]["test/pretrained/linear_top1"],
        "encoder_knn_all_labels": first["metrics"]["test/pretrained/knn_top1"],
        "random_init_linear_all_labels": first["metrics"]["test/random_init/linear_top1"],
        "chain_seconds": sum(v["seconds"] for v in first["stages"].values()),
        "stage_seconds_first_seed": first["stages"],
        **stage_times(per_seed),
    }


def stage_times(per_seed: dict[str, dict]) -> dict:
    """Each stage's compute time, the fastest of the seeds that computed it (the machine
    was shared with other benches for some of them: each seed's load average at its start
    is recorded), their sum, and the pretrain stage at its fastest epoch's rate (from its
    per-epoch times, when recorded)."""
    best: dict[str, float] = {}
    for rec in per_seed.values():
        for name, st in rec["stages"].items():
            # a run that continued an interrupted one timed only the rest of the stage
            if st.get("seconds") is not None and not st.get("resumed"):
                best[name] = min(best.get(name, float("inf")), st["seconds"])
    out: dict[str, Any] = {"stage_seconds_fastest": best, "chain_seconds_fastest": sum(best.values())}
    ep = next((r["pretrain_epochs"] for r in per_seed.values() if r.get("pretrain_epochs")), None)
    if ep and "pretrain" in best:
        overhead = best["pretrain"] - sum(ep["epoch_seconds"])  # start-up, val kNN, checkpoints
        at_fastest = overhead + len(ep["epoch_seconds"]) * min(ep["epoch_seconds"])
        out |= {
            "pretrain_epochs": ep,
            "pretrain_seconds_at_fastest_epoch_rate": at_fastest,
            "chain_seconds_at_fastest_pretrain_rate": out["chain_seconds_fastest"] - best["pretrain"] + at_fastest,
        }
    return out


def resummarize(path: Path, work: str, config: str = "fashion_mnist", shared_cores: bool = False) -> None:
    """Rewrite ``path``'s summary from its per-seed records, adding the pretrain run's
    per-epoch times from the work dir's MLflow store."""
    import mlflow

    from pipelines import tracking
    from pipelines.config import load_config

    data = json.loads(path.read_text())
    per_seed = data["per_seed"]
    uri = load_config(config, [f"work_dir={work}"]).tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    for rec in per_seed.values():  # records from before stage_seconds said which runs continued another
        for st in rec["stages"].values():
            rid = run_of(st)
            if "resumed" not in st and rid:
                st["resumed"] = _resumed(client, client.get_run(rid), tracking.load_outputs(rid))
    first = per_seed[sorted(per_seed, key=int)[0]]
    pre = first["stages"]["pretrain"]
    rid = run_of(pre) or first.get("pretrain_run_id")
    if not rid:  # a record from before the run ids were kept: the work dir's one computed pretrain
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "tags.`clpipe.stage` = 'pretrain' and tags.`clpipe.cache_hit` = 'false'",
        )
        rid = runs[0].info.run_id if len(runs) == 1 else None
    if rid:
        hist = {
            k: [m.value for m in sorted(client.get_metric_history(rid, k), key=lambda m: m.step)]
            for k in ("train/epoch_seconds", "train/images_per_sec")
        }
        first["pretrain_epochs"] = {
            "epoch_seconds": hist["train/epoch_seconds"],
            "images_per_sec": hist["train/images_per_sec"],
            "run_id": rid,
        }
    shared = shared_cores or data.get("shared_cores", False)
    path.write_text(
        json.dumps(
            {"machine": data["machine"], "date": data["date"], "shared_cores": shared, **summarize(per_seed)}, indent=2
        )
    )
    print(f"written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recipe")
    r.add_argument(
        "--space",
        default="{optimizer: {choice: [lars, sgd]}, lr_base: {choice: [0.3, 1.0, 3.0]}, "
        "weight_decay: {choice: [1.0e-6, 1.0e-4, 5.0e-4]}, crop_min_scale: {choice: [0.08, 0.2, 0.5]}, "
        "hflip_prob: {choice: [0.0, 0.5]}, head_layers: {choice: [2, 3]}, temperature: {choice: [0.1, 0.2, 0.5]}}",
    )
    r.add_argument("--trial-epochs", type=int, default=10)
    r.add_argument("--samples", type=int, default=16, help="trials drawn from the space (seeded)")
    a = sub.add_parser("ablations")
    a.add_argument("--temperatures", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    t = sub.add_parser("targets")
    en = sub.add_parser("encoders", help="the pretrain stage per recipe variant, each encoder probed with all labels")
    en.add_argument("variants", nargs="+", help="NAME or NAME:OVERRIDE,... (shipped: the config as it is)")
    di = sub.add_parser("distill-init", help="the students of each distill.init side by side on one seed's teachers")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument(
        "--inits",
        nargs="+",
        default=["scratch", "pretrained", "teacher"],
        help="INIT, or INIT:KEY=VALUE,... with more distill.* overrides (e.g. pretrained:lr_base=0.1)",
    )
    di.add_argument("--out", help="the JSON to write (default: bench/results/fashion_distill_init.json)")
    ft = sub.add_parser("finetunes", help="the fine-tune stage per variant on one fraction: teacher vs baseline, val")
    ft.add_argument("variants", nargs="+", help="NAME or NAME:OVERRIDE,... (finetune.* overrides)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--fraction", type=float, default=0.01)
    ft.add_argument("--base", nargs="*", default=[], help="overrides every variant shares (the encoder's recipe)")
    pb = sub.add_parser("pretrain-budget", help="teacher vs baseline on one fraction per pretraining length, val")
    pb.add_argument("epochs", type=int, nargs="+", help="pretrain.epochs values, one encoder each")
    pb.add_argument("--fraction", type=float, default=0.01)
    pb.add_argument("--base", nargs="*", default=[], help="overrides of every budget (e.g. pretrain.backbone_width=64)")
    pb.add_argument("--tag", help="the record's suffix, required with --base and only with it (e.g. width64)")
    for p in (r, a, t, di, en, ft, pb):
        p.add_argument("--work-dir", help="default: a fresh temporary directory")
    for p in (a, t, pb):
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument(
        "--config",
        default="fashion_mnist",
        help="fashion_mnist_gpu: the one-GPU variant (bench/results/fashion_targets_gpu.json)",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        help="a config override (a quick check of the script; with --out elsewhere than bench/results)",
    )
    t.add_argument("--out", help="the JSON to write (default: bench/results/fashion_targets[_gpu].json)")
    t.add_argument(
        "--small-student",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also distill the small student (width 16) per seed (about 27 minutes per seed on 2 cores)",
    )
    rs = sub.add_parser("resummarize", help="rewrite a targets JSON's summary (adds the pretrain epochs' times)")
    rs.add_argument("path", type=Path)
    rs.add_argument("--work-dir", required=True)
    rs.add_argument("--config", default="fashion_mnist")
    rs.add_argument(
        "--shared-cores",
        action="store_true",
        help="record that other work shared the cores during every run (the stage times are then upper bounds)",
    )
    args = ap.parse_args()
    if not Path(FASHION).is_dir():
        sys.exit(f"{FASHION} is missing: make fashion-mnist-data (or apt-get install -y dataset-fashion-mnist)")
    work = args.work_dir or tempfile.mkdtemp(prefix="clpipe-fashion-")
    if args.cmd == "resummarize":
        resummarize(args.path, work, args.config, args.shared_cores)
    elif args.cmd == "recipe":
        recipe(work, args.space, args.trial_epochs, args.samples)
    elif args.cmd == "distill-init":
        distill_init(work, args.seed, args.inits, args.out)
    elif args.cmd == "finetunes":
        finetunes(work, args.seed, args.base, args.variants, args.fraction)
    elif args.cmd == "pretrain-budget":
        pretrain_budget(work, args.epochs, args.seeds, args.fraction, args.base, args.tag)
    elif args.cmd == "encoders":
        encoders(work, args.variants)
    elif args.cmd == "ablations":
        ablations(work, args.seeds, args.temperatures)
    else:
        targets(work, args.seeds, args.config, args.set, args.out, args.small_student)


if __name__ == "__main__":
    main()
