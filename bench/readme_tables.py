"""Put the recorded results into the docs: every figure between a page's
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` markers is generated here, from
bench/results/*.json (digits_default, digits_finetune, fashion_recipe, fashion_targets,
fashion_ablations, methods, scale, shard_rate, e2e) or from the code (each method's defaults and the comments that
give their source); nothing there is typed by hand. The pages: README.md,
bench/README.md, docs/methods.md.

    .venv/bin/python bench/readme_tables.py          # rewrite the pages
    .venv/bin/python bench/readme_tables.py --check  # exit 1 if one is stale
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT / "bench"))
from records import run_of  # noqa: E402  (the benches read their records the same way)


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def digits() -> str:
    d = _load("digits_default")
    if d is None:
        return "(run bench/digits_default.py)"
    r = d["runs"][0]
    st = r["stages"]
    m = r["metrics"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in st.items())
    best = ", ".join(f"{k} = {v}" for k, v in r["sweep_best"].items())
    stopped = sum(t["stopped_early"] for t in r["sweep_ranked"])
    n_test = int(m["test/num_samples"])
    load = d.get("load_average_at_start")
    busy = (
        ""
        if load is None or load < 0.5
        else (f" (the recorded run shared the machine: load average {load:.1f} at its start)")
    )
    lines = [
        f"On a 2-core machine with no GPU it took {r['seconds']:.0f} s{busy} ({stages}). The sweep picked {best} "
        f"(successive halving stopped {stopped} of the {len(r['sweep_ranked'])} trials). Run twice in a row in "
        f"fresh work dirs, the two runs' sweep decisions and metrics were "
        f"{'identical' if d['identical'] else 'NOT identical'} ({d['runs'][1]['seconds']:.0f} s the second time). "
        f"On the {n_test} test images:",
        "",
        "| label fraction | labels | encoder kNN | encoder linear | supervised baseline | teacher | student |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['label_fraction']:g} | {row['labels']:,} | {row['encoder_knn']:.3f} | "
            f"{row['encoder_linear']:.3f} | {row.get('baseline', float('nan')):.3f} | "
            f"{row.get('teacher', float('nan')):.3f} | {row.get('student', float('nan')):.3f} |"
        )
    lines.append(f"| 1 (all) | | {m['test/pretrained/knn_top1']:.3f} | {m['test/pretrained/linear_top1']:.3f} | | | |")
    lines.append(
        f"| random-init encoder, all labels | | {m['test/random_init/knn_top1']:.3f} | "
        f"{m['test/random_init/linear_top1']:.3f} | | | |"
    )
    lines.append("")
    lines.append(f"(`bench/digits_default.py`, {d['date']}; one test image is {100 / n_test:.2f} points.)")
    return "\n".join(lines)


def digits_finetune() -> str:
    d = _load("digits_finetune")
    if d is None:
        return "(run bench/digits_finetune.py)"
    seeds = [r["seed"] for r in next(iter(d["runs"].values()))]
    lines = [
        f"The teacher against a linear probe of its own encoder on the same 126 labels, test top-1 on "
        f"269 images, seeds {', '.join(map(str, seeds))}, each seed's encoder shared by every row "
        f"({' '.join(f'`{o}`' for o in d['budget'])}):",
        "",
        "| fine-tuning | teacher (mean) | teacher - probe, per seed (points) | mean | smallest |",
        "|---|---:|---|---:|---:|",
    ]
    for name, s in d["summary"].items():
        each = ", ".join(f"{100 * r['teacher_minus_probe']:+.1f}" for r in d["runs"][name])
        lines.append(
            f"| {name} | {s['mean_teacher']:.3f} | {each} | {100 * s['mean_teacher_minus_probe']:+.1f} | "
            f"{100 * s['min_teacher_minus_probe']:+.1f} |"
        )
    lines.append("")
    lines.append(f"(`bench/digits_finetune.py`, {d['date']}, {d['machine']['cpu_model']}.)")
    return "\n".join(lines)


def _pm(s: dict, scale: float = 1.0, fmt: str = ".3f") -> str:
    if len(s.get("values", [])) < 2:  # one seed: no spread to show
        return f"{s['mean'] * scale:{fmt}}"
    return f"{s['mean'] * scale:{fmt}} ± {s['std'] * scale:{fmt.lstrip('+')}}"


def _chain_rows(runs: list[tuple[str, str, dict, str]]) -> list[str]:
    """One table row per (colour augmentation, val checks, targets record, seed): each
    stage's minutes of compute and the test accuracies of that seed."""
    rows = []
    for aug, checks, rec, seed in runs:
        r = rec["per_seed"][seed]
        used = {r["config"][k].get("precision", "auto") for k in ("pretrain", "finetune", "distill")}
        precision = "bf16" if used == {"bf16"} else "fp32" if used <= {"auto", "fp32"} else "mixed"
        st = {k: v["seconds"] for k, v in r["stages"].items()}
        rows_by_fraction = {row["label_fraction"]: row for row in r["rows"]}
        m = r["metrics"]
        cells = [
            aug,
            checks,
            precision,
            *(f"{st[k] / 60:.1f}" for k in ("pretrain", "finetune", "distill")),
            f"{sum(st.values()) / 60:.1f}",
            f"{m['test/pretrained/linear_top1']:.3f}",
            f"{m['test/pretrained/knn_top1']:.3f}",
            *(
                f"{rows_by_fraction[f][k]:.3f}"
                for f in sorted(rows_by_fraction)
                for k in ("encoder_linear", "baseline", "teacher", "student")
            ),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _same_chain_twice(tg: dict, other: dict | None, other_name: str, what: str = "the shipped config") -> list[str]:
    """Whether the targets run's first seed and another record of the same config and seed,
    each computed from the start (its own shard, labels and pretrain), gave the same test
    accuracies: the chain's reproducibility from the start, Ray Train's two workers included."""
    seed = str(tg["seeds"][0])
    if other is None or seed not in other["per_seed"]:
        return []
    a, b = tg["per_seed"][seed], other["per_seed"][seed]
    if a["config"] != b["config"] or any(r["stages"]["pretrain"].get("cached") for r in (a, b)):
        return []

    def numbers(r: dict) -> dict:  # every test top-1 the evaluate stage logged
        return {k: v for k, v in r["metrics"].items() if k.startswith("test/") and k.endswith("top1")}

    na, nb = numbers(a), numbers(b)
    diff = max(abs(na[k] - nb[k]) for k in na.keys() & nb.keys())
    same = "the same test accuracies" if diff == 0 else f"test accuracies at most {diff * 100:.2f} pt apart"
    return [
        f"Run twice from the start (each its own shard, labels and pretrain), seed {seed} of {what} "
        f"gave {same}, all {len(na.keys() & nb.keys())} of them (the targets run, {tg['date']}, and "
        f"`{other_name}.json`, {other['date']}).",
        "",
    ]


def _but_epochs(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k != "epochs"}


def _small_student(tg: dict, epochs_run: dict | None) -> list[str]:
    """The small student's recipe as its distill runs logged it, its size against the
    teacher's, its distill time, and (``fashion_small_student``) its distill epochs side by
    side on the first seed's teachers, with the targets run's own first seed as one more row."""
    seeds = [str(s) for s in tg["seeds"]]
    recs = [tg["per_seed"][s] for s in seeds]
    if not all("small_recipe" in r for r in recs):
        return []
    rcp = recs[0]["small_recipe"]
    if any(r["small_recipe"] != rcp for r in recs):
        raise ValueError("fashion_targets.json: the seeds' small students were trained with different recipes")
    params, teacher_params = next(iter(recs[0]["small_params"].values()))
    minutes = [r["small_stages"]["distill"]["seconds"] / 60 for r in recs]
    out = [
        f"The small student: `small_cnn` of width {rcp['student_width']}, {params:,} parameters "
        f"({params / teacher_params:.2f} of the teacher's {teacher_params:,}), from {rcp['init']}, "
        f"temperature {float(rcp['temperature']):g}, {rcp['optimizer'].upper()} at lr {float(rcp['lr_base']):g}, "
        f"{rcp['epochs']} distill epochs over the unlabeled training images ({min(minutes):.1f}–{max(minutes):.1f} "
        "min of distill per seed; it is a bench experiment, not a stage of the chain above).",
        "",
    ]
    if epochs_run is None or str(epochs_run["seed"]) not in seeds:
        return out
    seed = str(epochs_run["seed"])
    own = tg["per_seed"][seed]
    teachers = {str(r["label_fraction"]): r["teacher"] for r in own["rows"]}
    if any(run["rows"][f]["teacher"] != teachers.get(f) for run in epochs_run["runs"].values() for f in run["rows"]):
        return out  # distilled from other teachers (another config's) than this record's
    rows = []
    for run in epochs_run["runs"].values():
        if "recipe" not in run:  # recorded before the runs' recipes were
            continue
        if _but_epochs(run["recipe"]) != _but_epochs(rcp):
            continue  # another recipe than the targets run's small student
        rows.append((int(run["recipe"]["epochs"]), run["rows"], run["distill_seconds"]))
    by_f = {str(r["label_fraction"]): r for r in own["small_rows"]}
    rows.append(
        (
            int(rcp["epochs"]),
            {f: {"student_minus_teacher": r["student"] - r["teacher"]} for f, r in by_f.items()},
            own["small_stages"]["distill"]["seconds"],
        )
    )
    fr = sorted(by_f, key=float)
    out += [
        f"Its distill epochs on seed {seed}'s teachers (`bench/fashion_mnist.py distill-init`, "
        f"`fashion_small_student.json`, {epochs_run['date']}, and this targets run):",
        "",
        "| distill epochs | " + " | ".join(f"small − teacher, {float(f):g}" for f in fr) + " | distill min |",
        "|---:|" + "---:|" * (len(fr) + 1),
    ]
    for ep, r, secs in sorted(rows, key=lambda x: x[0]):
        cells = [f"{r[f]['student_minus_teacher'] * 100:+.1f} pt" for f in fr]
        out.append(f"| {ep} | " + " | ".join(cells) + f" | {secs / 60:.1f} |")
    return [*out, ""]


def _chain_variants(
    loader: dict, device: dict, checked: dict | None, fp32: dict | None, bf16: dict | None
) -> list[str]:
    """The first seed of the earlier targets run (``fashion_targets_loader``: colour
    augmentation in the loader processes, a val check every epoch) against the same chain
    with ``pretrain.views.augment_on: device``, with that and ``finetune.val_checks`` as
    shipped, and the shipped config from the start in fp32 and with bf16 autocast in the
    three training stages, those two one after the other on one host."""
    seed = str(device["seeds"][0])
    fr = sorted(r["label_fraction"] for r in device["per_seed"][seed]["rows"])
    heads = [f"{h} {f:g}" for f in fr for h in ("probe", "baseline", "teacher", "student")]
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config

    cfg = load_config("fashion_mnist")
    shipped, val_checks = cfg.pretrain.views.augment_on, cfg.finetune.val_checks
    then = loader["per_seed"][seed]["config"]["pretrain"]["views"]["augment_on"]
    e2e = _load("e2e_full")
    fast = ""
    if e2e is not None:
        sides = {st.get("augment_on"): st for st in e2e["stage"].values()}
        if "device" in sides and "loader" in sides:
            ratio = sides["device"]["images_per_sec"] / sides["loader"]["images_per_sec"]
            fast = (
                f" (at global batch {e2e['global_batch']}, {ratio:.2f}x the images/s of the loader path: "
                "bench/README.md, `e2e_full.json`)"
            )

    def checks_of(rec: dict) -> str:
        n = rec["per_seed"][seed]["config"]["finetune"].get("val_checks")
        return "every epoch" if n is None else f"{n} per model"

    runs = [
        ("loader processes", checks_of(loader), loader, seed),
        ("batched in the workers", checks_of(device), device, seed),
    ]
    text = [
        f"An earlier targets run (`fashion_targets_loader.json`, {loader['date']}) made pretraining's colour "
        f"augmentation with `pretrain.views.augment_on: {then}` "
        f"and checked the fine-tuned models on val after every epoch; `fashion_mnist.yaml` ships "
        f"`augment_on: {shipped}`{fast} and `finetune.val_checks: {val_checks}`. The same chain each way, seed "
        f"{seed}, everything else equal (`bench/fashion_mnist.py targets`: `--set pretrain.views.augment_on=device` "
        f"on {device['date']}"
    ]
    if checked is not None:
        runs.append(("batched in the workers", checks_of(checked), checked, seed))
        text[0] += f", and the shipped config on {checked['date']}, its pretrain the run before's, cached"
    pair = [r for r in (fp32, bf16) if r is not None]
    if pair:
        runs += [("batched in the workers", checks_of(r), r, seed) for r in pair]
        flags = ", ".join(pair[0]["machine"].get("cpu_flags", [])) or "not recorded"
        what = " and ".join(
            w
            for r, w in ((fp32, "in fp32"), (bf16, "with `precision: bf16` in pretrain, finetune and distill"))
            if r is not None
        )
        text[0] += (
            f", and on {pair[0]['date']} the shipped config from the start (its own pretrain) {what}, "
            f"{'one after the other ' if len(pair) > 1 else ''}on one host, a CPU with {flags}"
        )
        e2e = _load("e2e_compile")
        if bf16 is not None and e2e is not None and {"default", "bf16"} <= set(e2e["stage"]):
            st = e2e["stage"]
            ratio = st["bf16"]["images_per_sec"] / st["default"]["images_per_sec"]
            text[0] += (
                f" (there bf16 trained pretrain at {ratio:.2f}x "
                "the fp32 default's images/s: `e2e_compile.json`; bf16's speed depends on the CPU's vector units, "
                "so fp32 stays the CPU default)"
            )
    text[0] += "; minutes of compute, shard and labels shared):"
    return [
        *text,
        "",
        "| colour augmentation | val checks | precision | pretrain min | finetune min | distill min | chain min | "
        "probe, all labels | kNN, all labels | " + " | ".join(heads) + " |",
        "|---|---|---|" + "---:|" * (6 + len(heads)),
        *_chain_rows(runs),
        "",
    ]


def _flat(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _variant_chain(tg: dict | None, base: dict, name: str) -> list[str]:
    """A targets record run with overrides (``--set``) of ``base``'s config: what its
    config changed (from the two records), its stages' compute time and its table."""
    if tg is None:
        return []
    sets = _overrides(tg, base)
    fast = tg.get("stage_seconds_fastest") or {k: v["seconds"] for k, v in tg["stage_seconds_first_seed"].items()}
    st = ", ".join(f"{k} {v / 60:.1f} min" for k, v in fast.items())
    n = len(tg["seeds"])
    return [
        f"The chain with {', '.join(f'`{o}`' for o in sets)} (`bench/fashion_mnist.py targets --set`, "
        f"`{name}.json`, "
        f"{tg['date']}): {st}; {sum(fast.values()) / 60:.1f} min in all (each stage's fastest run). "
        "Its encoder's linear probe with all labels: "
        f"{tg['encoder_linear_all_labels']:.3f} (random-init {tg['random_init_linear_all_labels']:.3f}); "
        + (f"mean ± std over {n} fine-tune/distill seeds:" if n > 1 else "one seed:"),
        "",
        *_targets_table(tg),
        "",
        *_small_student(tg, _load("fashion_small_student")),
    ]


def _overrides(tg: dict, base: dict) -> list[str]:
    """What a targets record run with ``--set`` changed of ``base``'s config, as overrides."""
    was = _flat(next(iter(base["per_seed"].values()))["config"])
    sets = set()
    for r in tg["per_seed"].values():
        now = _flat(r["config"])  # a key it lacks: a field left unset (null), absent from its dump
        sets |= {
            f"{k}={'null' if now.get(k) is None else now[k]}"
            for k in now.keys() | was.keys()
            if was.get(k) != now.get(k)
        }
    return sorted(sets)


def _gap_beside(var: dict | None, ref: dict, name: str) -> list[str]:
    """A targets record run with ``--set`` (``name``) beside the shipped chain's record on the
    seeds both hold: per label fraction, teacher − baseline on the test set seed by seed and
    its distance to the target. Paired only when both used one pretrain run."""
    if var is None:
        return []
    seeds = sorted(var["per_seed"].keys() & ref["per_seed"].keys(), key=int)
    if not seeds:
        return []
    what = ", ".join(f"`{o}`" for o in _overrides(var, ref))

    def gaps(rec: dict, f: float) -> list[float]:  # points, in ``seeds`` order
        rows = (next(r for r in rec["per_seed"][s]["rows"] if r["label_fraction"] == f) for s in seeds)
        return [100 * (r["teacher"] - r["baseline"]) for r in rows]

    def encoder(rec: dict) -> tuple[str, float]:  # the pretrain run and its last epoch's val kNN
        r = rec["per_seed"][seeds[0]]
        st = r["stages"]["pretrain"]
        return st.get("computed_in_run") or st["run_id"], r["curves"]["pretrain"]["val/knn_top1"][-1]

    out = [
        f"The chain with {what} beside the shipped chain on the test set (`{name}.json` beside "
        f"`fashion_targets.json`, {var['date']}), teacher − baseline in points, "
        + (f"seeds {', '.join(seeds)}, seed by seed:" if len(seeds) > 1 else f"seed {seeds[0]}:"),
        "",
        f"| labels | shipped | {what} | difference, mean | target |",
        "|---:|---:|---:|---:|---|",
    ]
    for f, t in sorted(var["table"].items(), key=lambda kv: float(kv[0])):
        a, b = gaps(ref, float(f)), gaps(var, float(f))
        target = _gap_target(float(f))
        mean = sum(b) / len(b)
        verdict = f"met, {mean - target:.1f} pt to spare" if mean >= target else f"missed by {target - mean:.1f} pt"
        out.append(
            f"| {float(f):g} ({t['labels']:,}) | {' / '.join(f'{x:+.1f}' for x in a)} | "
            f"{' / '.join(f'{x:+.1f}' for x in b)} | {(sum(b) - sum(a)) / len(b):+.1f} pt | +{target:g}: {verdict} |"
        )
    (ra, ka), (rb, kb) = encoder(ref), encoder(var)
    out += [
        "",
        "One encoder under both chains, so the differences are paired."
        if ra == rb
        else f"The two chains' encoders are two pretrain runs of the shipped recipe and seed (val kNN at the last "
        f"epoch {ka:.3f} and {kb:.3f}), so the differences are not paired on the encoder; the baselines do not "
        "use it.",
        "",
        f"Its own table ({'mean ± std over its seeds' if len(var['seeds']) > 1 else 'one seed'}):",
        "",
        *_targets_table(var),
        "",
    ]
    return out


def _targets_table(tg: dict) -> list[str]:
    """A targets record's table: per label fraction, mean ± std over its seeds (the small
    student's columns where the record has them)."""
    small = all("small_student" in r for r in tg["table"].values())
    head = (
        "| labels | baseline | teacher | teacher − baseline | linear probe | teacher − probe | student "
        "| student − teacher |"
    )
    out = [
        head + (" small student (≤ ¼ params) | small − teacher |" if small else ""),
        "|---:|" + "---:|" * (9 if small else 7),
    ]
    for f, r in sorted(tg["table"].items(), key=lambda kv: float(kv[0])):
        line = (
            f"| {float(f):g} ({r['labels']:,}) | {_pm(r['baseline'])} | {_pm(r['teacher'])} | "
            f"{_pm(r['teacher_minus_baseline'], 100, '+.1f')} pt | {_pm(r['encoder_linear'])} | "
            f"{_pm(r['teacher_minus_linear'], 100, '+.1f')} pt | {_pm(r['student'])} | "
            f"{_pm(r['student_minus_teacher'], 100, '+.1f')} pt |"
        )
        if small:
            line += f" {_pm(r['small_student'])} | {_pm(r['small_minus_teacher'], 100, '+.1f')} pt |"
        out.append(line)
    return out


def _encoders(tg: dict, en: dict | None) -> list[str]:
    """The pretrain stage per recipe variant on all training images, each encoder probed
    with all labels (``fashion_encoders.json``); a variant whose run is the targets
    record's pretrain is named so."""
    if en is None:
        return []
    chain = {run_of(r["stages"]["pretrain"]) for r in tg["per_seed"].values()}
    out = [
        "The pretrain stage alone per recipe variant on all 54,000 training images, each encoder's linear probe "
        "fitted on all training labels as evaluate fits it (`bench/fashion_mnist.py encoders`, "
        f"`fashion_encoders.json`, {en['date']}):",
        "",
        "| variant | features | pretrain min | val kNN per epoch, first → best (epoch) → last | probe on its "
        "training features | probe, val | probe, test | kNN, test |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in en["variants"].values():
        curve = r["val_knn_per_epoch"]
        best = max(range(len(curve)), key=curve.__getitem__)
        over = ", ".join(f"`{o}`" for o in r["overrides"]) or "the shipped config"
        if run_of(r["pretrain"]) in chain:
            over += " (the chain's encoder above)"
        out.append(
            f"| {over} | {r['feat_dim']} | {r['pretrain']['seconds'] / 60:.1f} | "
            f"{curve[0]:.3f} → {curve[best]:.3f} ({best + 1}) → {curve[-1]:.3f} | "
            f"{r['train/linear_top1']:.3f} | {r['val/linear_top1']:.3f} | "
            f"{r['test/linear_top1']:.3f} | {r['test/knn_top1']:.3f} |"
        )
    pick = max(en["variants"].values(), key=lambda r: r["val/linear_top1"])
    over = ", ".join(f"`{o}`" for o in pick["overrides"]) or "the shipped config"
    out += [
        "",
        f"Chosen on val, {over} probes at {pick['test/linear_top1']:.3f} on the test images "
        f"(target 0.88: {100 * (pick['test/linear_top1'] - 0.88):+.1f} pt).",
    ]
    return [*out, ""]


def _finetunes(ft: dict | None, tg: dict | None) -> list[str]:
    """The fine-tune stage per variant on one fraction and seed (``fashion_finetunes.json``):
    the teacher and the supervised baseline (the same network from scratch, trained with the
    same variant) side by side on val, and the best of each whatever the variant."""
    if ft is None:
        return []
    st = ft["setting"]
    rows = ft["variants"]

    def one(r: dict, kind: str) -> float:
        return next(v for n, v in r["val_top1"].items() if n.startswith(kind))

    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config

    shipped = load_config("fashion_mnist").pretrain == load_config("fashion_mnist", st["base"]).pretrain
    out = [
        f"Fine-tuning knobs at {st['fraction']:g} labels, seed {st['seed']}, on "
        + (
            "the shipped config's encoder (the chain's above)"
            if shipped
            else "the encoder of " + ", ".join(f"`{o}`" for o in st["base"])
        )
        + f" (`bench/fashion_mnist.py finetunes`, `fashion_finetunes.json`, {ft['date']}). Each variant trains the "
        "teacher and its baseline alike; val top-1 of the epoch each selects:",
        "",
        "| variant | from head layer | teacher | baseline | teacher − baseline | finetune min |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        over = ", ".join(f"`{o}`" for o in r["overrides"]) or "as shipped"
        t, b = one(r, "teacher"), one(r, "baseline")
        out.append(
            f"| {over} | {r['from_head_layer']} | {t:.3f} | {b:.3f} | {100 * (t - b):+.1f} pt | "
            f"{r['finetune']['seconds'] / 60:.1f} |"
        )
    bt = max(one(r, "teacher") for r in rows.values())
    bb = max(one(r, "baseline") for r in rows.values())
    verdict = (
        "no knob here closes the gap"
        if bt - bb < 0.05
        else "a knob here closes the gap (not yet shipped: see the targets table)"
    )
    row = (tg or {}).get("table", {}).get(str(st["fraction"]))
    probe = (
        f" In the targets run the encoder's linear probe on these labels reaches {row['encoder_linear']['mean']:.3f} "
        f"on the test images, the baseline {row['baseline']['mean']:.3f}: a linear classifier on the pretrained "
        "features does no better than the same network trained from scratch on these labels."
        if row is not None and row["encoder_linear"]["mean"] <= row["baseline"]["mean"]
        else ""
    )
    out += [
        "",
        f"The best teacher of any variant ({bt:.3f}) against the best baseline of any ({bb:.3f}): "
        f"{100 * (bt - bb):+.1f} pt, where the target is +5: {verdict}.{probe}",
        "",
    ]
    return out


def _budget_cells(r: dict) -> str:
    """One encoder's row of a ``pretrain-budget`` record, from its last val kNN to teacher −
    baseline: the cells every table of those records shares."""
    sm = r["summary"]
    return (
        f"{r['val_knn_per_epoch'][-1]:.3f} | {_pm(sm['probe'])} | {_pm(sm['teacher'])} | {_pm(sm['baseline'])} | "
        f"{_pm(sm['teacher_minus_baseline'], 100, '+.1f')} pt"
    )


def _pretrain_budget(pb: dict | None, name: str, first: bool) -> list[str]:
    """Teacher vs baseline on one fraction per pretraining length (``fashion_pretrain_budget_*.json``):
    one encoder per length, the fine-tune stage on one or more seeds, val top-1 (mean ± std);
    then the change per doubling of the pretraining from the shortest to the longest, and the
    gap's over the last doubling (what pretraining longer still would add)."""
    if pb is None or not pb["budgets"]:
        return []
    st = pb["setting"]
    rows = sorted(pb["budgets"].values(), key=lambda r: r["pretrain_epochs"])
    seeds = f"seed {st['seeds'][0]}" if len(st["seeds"]) == 1 else f"seeds {st['seeds']}, mean ± std"
    intro = (
        f"The same gap per pretraining length at {st['fraction']:g} labels (`bench/fashion_mnist.py pretrain-budget`, "
        f"`{name}.json`, {pb['date']}): one encoder per length (the shipped recipe, its schedule stretched to the "
        f"length), the fine-tune stage as shipped on {seeds}; val top-1 of the epoch each model selects "
        "(probe: the linear classifier the teacher starts from):"
        if first
        else f"At {st['fraction']:g} labels, the same encoders, {seeds} (`{name}.json`, {pb['date']}):"
    )
    out = [
        intro,
        "",
        "| pretrain epochs | pretrain min | val kNN, last epoch | probe | teacher | baseline | teacher − baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['pretrain_epochs']} | {r['pretrain']['seconds'] / 60:.1f} | {_budget_cells(r)} |")
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        doublings = math.log2(hi["pretrain_epochs"] / lo["pretrain_epochs"])

        def moved(key: str) -> float:  # points per doubling of the pretraining (no -0.0)
            return round(100 * (hi["summary"][key]["mean"] - lo["summary"][key]["mean"]) / doublings, 1) + 0.0

        prev = rows[-2]  # the last doubling (or step) of the pretraining: what continuing it would add
        gap_prev, gap_hi = (100 * r["summary"]["teacher_minus_baseline"]["mean"] for r in (prev, hi))
        last = round((gap_hi - gap_prev) / math.log2(hi["pretrain_epochs"] / prev["pretrain_epochs"]), 1) + 0.0
        target = _gap_target(st["fraction"])
        need = target - gap_hi
        if need <= 0:
            tail = ""
        elif last > 0:
            n = need / last
            tail = (
                f" Continued at that rate, the +{target:g}-point target would take about {n:.0f} more doublings "
                f"(about {2**n:,.0f}x the {hi['pretrain_epochs']}-epoch pretraining)."
            )
        else:
            tail = " The last doubling did not narrow the gap."
        out += [
            "",
            f"From {lo['pretrain_epochs']} to {hi['pretrain_epochs']} epochs, per doubling of the pretraining: the "
            f"probe {moved('probe'):+.1f} pt, the teacher {moved('teacher'):+.1f} pt, the baseline (no pretraining, "
            f"the same seeds) {moved('baseline'):+.1f} pt, teacher − baseline {moved('teacher_minus_baseline'):+.1f} "
            f"pt; from {prev['pretrain_epochs']} to {hi['pretrain_epochs']} epochs teacher − baseline {last:+.1f} pt "
            f"per doubling.{tail}",
        ]
    return out + [""]


def _gap_target(fraction: float) -> float:
    """Issue 19's teacher − baseline target in points: +5 at 1% labels, +1 at 10%."""
    return 5.0 if fraction <= 0.01 else 1.0


def _seed_diffs(a: dict, b: dict, key: str) -> str:
    """Two ``pretrain-budget`` rows of the same seeds: a − b in points, seed by seed."""
    pairs = zip(a["summary"][key]["values"], b["summary"][key]["values"], strict=True)
    return ", ".join(f"{100 * (x - y):+.1f}" for x, y in pairs)


def _budget_variant(names: tuple[str, str], what: str, how: str) -> list[str]:
    """A ``pretrain-budget --base ... --tag`` record's rows (``names[0]``) beside a reference
    record's rows (``names[1]``) of the same pretraining length (same fraction and seeds):
    ``what`` names the variant, ``how`` says what differs. Each row is labelled by its
    record's overrides ("shipped" for none). Nothing when either record is missing."""
    var, ref = _load(names[0]), _load(names[1])
    if var is None or ref is None:
        return []
    for key in ("fraction", "seeds"):
        if ref["setting"][key] != var["setting"][key]:
            raise SystemExit(
                f"{names[0]}.json: setting.{key} {var['setting'][key]} differs from {names[1]}.json's "
                f"{ref['setting'][key]}; rerun the variant with the reference's {key}"
            )

    def label(rec: dict) -> str:
        return ", ".join(f"`{o}`" for o in rec["setting"].get("base", [])) or "shipped"

    def encoder(row: dict) -> str:  # the pretrain run that trained the row's encoder
        return row["pretrain"].get("computed_in_run") or row["pretrain"]["run_id"]

    rows, paired = [], []
    st = var["setting"]
    target = _gap_target(st["fraction"])
    by_seed = " seed by seed" if len(st["seeds"]) > 1 else ""
    for e, v in sorted(var["budgets"].items(), key=lambda kv: kv[1]["pretrain_epochs"]):
        r = ref["budgets"].get(e)
        if r is None:
            continue
        rows += [
            f"| {label(rec)} | {row['pretrain_epochs']} | {_budget_cells(row)} |" for rec, row in ((ref, r), (var, v))
        ]
        if encoder(r) != encoder(v):
            continue

        gap = 100 * v["summary"]["teacher_minus_baseline"]["mean"]
        verdict = (
            f"the +{target:g}-point target is met with {gap - target:.1f} pt to spare"
            if gap >= target
            else f"the +{target:g}-point target is missed by {target - gap:.1f} pt"
        )
        paired.append(
            f"One encoder under both rows ({e} epochs), so the differences are paired, {label(var)} − "
            f"{label(ref)}{by_seed}: teacher {_seed_diffs(v, r, 'teacher')} pt, baseline "
            f"{_seed_diffs(v, r, 'baseline')} pt, teacher − baseline "
            f"{_seed_diffs(v, r, 'teacher_minus_baseline')} pt; at {label(var)} {verdict} (val)."
        )
    if not rows:
        return []
    seeds = f"seed {st['seeds'][0]}" if len(st["seeds"]) == 1 else f"seeds {st['seeds']}, mean ± std"
    return [
        f"{what} at {st['fraction']:g} labels (`{names[0]}.json` beside `{names[1]}.json`, {var['date']}): "
        f"{how}; {seeds}, val top-1:",
        "",
        "| overrides | pretrain epochs | val kNN, last epoch | probe | teacher | baseline | teacher − baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        *(["", *paired] if paired else []),
        "",
    ]


def fashion() -> str:
    out: list[str] = []
    rec = _load("fashion_recipe")
    if rec is not None:
        a, b = rec["runs"]["digits_recipe"], rec["runs"]["chosen"]
        best = ", ".join(f"{k} {v}" for k, v in rec["sweep"]["best"].items())
        out += [
            f"The recipe: the sweep stage drew {len(rec['sweep']['ranked'])} recipes on 8,000 training images "
            f"(6,400 trained on, 10 epochs, global batch 64) and kept {best}. Trained side by side in that "
            f"setting and scored on 2,000 official test images:",
            "",
            "| recipe | kNN (6,400 labels) | linear probe (800 labels) |",
            "|---|---:|---:|",
            f"| digits' recipe at 28 px | {a['knn_top1']:.3f} | {a['probe_top1']:.3f} |",
            f"| chosen on Fashion-MNIST | {b['knn_top1']:.3f} | {b['probe_top1']:.3f} |",
            "",
            f"A gain of {rec['gain_probe_points']:+.1f} points of probe (`bench/fashion_mnist.py recipe`, "
            f"{rec['date']}).",
            "",
        ]
    tg = _load("fashion_targets")
    if tg is not None:
        n = len(tg["seeds"])
        fast = tg.get("stage_seconds_fastest") or {k: v["seconds"] for k, v in tg["stage_seconds_first_seed"].items()}
        st = ", ".join(f"{k} {v / 60:.1f} min" for k, v in fast.items())
        cpu = tg.get("machine", {}).get("cpu_model") or "this machine"
        out += [
            f"The 2-core chain (`clpipe run fashion_mnist`, {cpu}): {st}; {sum(fast.values()) / 60:.1f} min in all "
            "(each stage's compute time, the fastest of its runs here: shard, labels and pretrain ran once, "
            f"finetune, distill and evaluate once per seed"
            + (
                "; every one of these runs shared the 2 cores with other work, so the times are upper bounds)."
                if tg.get("shared_cores")
                else ")."
            )
        ]
        ep = tg.get("pretrain_epochs")
        if ep:
            rates = ep["images_per_sec"]
            later = rates[1:] or rates
            why = (
                "other benches shared the cores for some of them"
                if tg.get("shared_cores")
                else "the first epoch includes the workers' start-up"
            )
            out[-1] += (
                f" The pretrain epochs ran at {min(rates):.0f}–{max(rates):.0f} images/s "
                f"({min(later):.0f}–{max(later):.0f} after the first; {why}); at its fastest epochs' rate "
                f"pretrain takes {tg['pretrain_seconds_at_fastest_epoch_rate'] / 60:.1f} min and the chain "
                f"{tg['chain_seconds_at_fastest_pretrain_rate'] / 60:.1f} min."
            )
        out += [
            "",
            f"The encoder's linear probe with all labels: {tg['encoder_linear_all_labels']:.3f} (random-init "
            f"encoder {tg['random_init_linear_all_labels']:.3f}). On the official 10,000 test images, "
            + (
                f"mean ± std over {n} fine-tune/distill seeds on one pretrained encoder:"
                if n > 1
                else "one seed (the repeats over fine-tune/distill seeds are still to run):"
            ),
            "",
            *_targets_table(tg),
        ]
        out += ["", f"(`bench/fashion_mnist.py targets`, {tg['date']}.)", ""]
        out += _small_student(tg, _load("fashion_small_student"))
        fp32 = _load("fashion_targets_fp32")
        old128 = _load("fashion_targets_128")
        out += _same_chain_twice(tg, fp32, "fashion_targets_fp32")
        if old128 is not None:
            out += _same_chain_twice(
                old128, fp32, "fashion_targets_fp32", "the 128-d chain (`fashion_targets_128.json`, below)"
            )
        dev, old = _load("fashion_targets_device"), _load("fashion_targets_loader")
        if dev is not None and old is not None:
            out += _chain_variants(old, dev, _load("fashion_targets_val_checks"), fp32, _load("fashion_targets_bf16"))
        out += _encoders(tg, _load("fashion_encoders"))
        out += _variant_chain(old128, tg, "fashion_targets_128")
        out += _finetunes(_load("fashion_finetunes"), tg)
        budgets = [n for n in ("fashion_pretrain_budget_1pct", "fashion_pretrain_budget_10pct") if _load(n)]
        for i, name in enumerate(budgets):
            out += _pretrain_budget(_load(name), name, first=i == 0)
        out += _budget_variant(
            ("fashion_pretrain_budget_1pct_width64", "fashion_pretrain_budget_1pct"),
            "A wider network",
            "the same pretraining and fine-tuning, the encoder and its from-scratch baseline both built wider "
            "(no pretraining minutes: the two records ran on different machines, so their times do not compare)",
        )
        for pct in ("1pct", "10pct"):
            out += _budget_variant(
                (f"fashion_pretrain_budget_{pct}_head0", f"fashion_pretrain_budget_{pct}_head1"),
                "Fine-tuning from the encoder's output",
                "the teacher and its from-scratch baseline alike start their classifier at head layer 0 (on the "
                "encoder's features) or at head layer 1 (the shipped setting, SimCLRv2's, after the projection "
                "head's first layer); the shipped recipe's encoder, pretrained once more for these rows",
            )
        out += _gap_beside(_load("fashion_targets_head0"), tg, "fashion_targets_head0")
    di = _load("fashion_distill_init")
    if di is not None:
        runs = di["runs"]
        fr = sorted(next(iter(runs.values()))["rows"], key=float)
        out += [
            f"Where the self-distilled student starts (`distill.init`), side by side on seed {di['seed']}'s "
            "teachers (one pretrained encoder, every upstream stage shared; `bench/fashion_mnist.py "
            "distill-init`, " + di["date"] + "; a row without overrides trains as the distill section did before, "
            "LARS at lr 0.5):",
            "",
            "| distill.init | " + " | ".join(f"student − teacher, {float(f):g}" for f in fr) + " | distill |",
            "|---|" + "---:|" * (len(fr) + 1),
        ]
        for init, r in runs.items():
            label = init.replace(":", " with distill.").replace(",", ", distill.")
            out.append(
                f"| {label} | "
                + " | ".join(
                    f"{r['rows'][f]['student_minus_teacher'] * 100:+.1f} pt ({r['rows'][f]['student']:.3f})" for f in fr
                )
                + f" | {r['distill_seconds'] / 60:.1f} min |"
            )
        out.append("")
    ab = _load("fashion_ablations")
    if ab is not None:
        out += [
            f"SimCLR's ablations in the 8,000-image setting, mean ± std over seeds {ab['seeds']}:",
            "",
            "| variant | linear probe (800 labels) | kNN |",
            "|---|---:|---:|",
        ]

        def order(name: str) -> tuple:  # the heads as SimCLR's Figure 8 (3, 1, 0 layers), then temperature ascending
            key, value = name.split("=")
            return (key, -float(value) if key == "head_layers" else float(value))

        for name in sorted(ab["rows"], key=order):
            r = ab["rows"][name]
            out.append(f"| {name} | {_pm(r['probe_top1'])} | {_pm(r['knn_top1'])} |")
        rows = ab["rows"]

        def pt(a: str, b: str) -> float:
            return 100 * (rows[a]["probe_top1"]["mean"] - rows[b]["probe_top1"]["mean"])

        def sd(*names: str) -> float:
            return 100 * max(rows[n]["probe_top1"]["std"] for n in names)

        heads = [f"head_layers={k}" for k in (3, 1, 0)]
        if all(h in rows for h in heads):
            out += [
                "",
                f"Probe, head: nonlinear (3 layers) − linear {pt(heads[0], heads[1]):+.1f} pt, linear − none "
                f"{pt(heads[1], heads[2]):+.1f} pt (the seeds' std up to {sd(*heads):.1f} pt).",
            ]
        temps = sorted((float(n.split("=")[1]), n) for n in rows if n.startswith("temperature="))
        if len(temps) >= 3:
            best_t, best = max(temps, key=lambda tn: rows[tn[1]]["probe_top1"]["mean"])
            where = "interior" if best_t not in (temps[0][0], temps[-1][0]) else "at an end of the range"
            others = ", ".join(f"{pt(best, n):+.1f} pt over T = {t:g}" for t, n in temps if n != best)
            out[-1] += (
                f" Temperature: the best mean probe is at T = {best_t:g} ({where}; {others}; the seeds' std "
                f"up to {sd(*(n for _, n in temps)):.1f} pt)."
            )
        out += ["", f"(`bench/fashion_mnist.py ablations`, {ab['date']}.)"]
    return "\n".join(out).strip() or "(run bench/fashion_mnist.py)"


def method_defaults() -> str:
    """Each method's hyperparameters, defaults and the source its constructor names."""
    import inspect

    sys.path.insert(0, str(ROOT))
    from cl_core.methods import get_method, known_methods, method_params

    lines = ["| method | hyperparameter | default | source |", "|---|---|---|---|"]
    for m in known_methods():
        src = inspect.getsource(get_method(m).__init__).splitlines()
        for k, v in method_params(m).items():
            line = next((ln for ln in src if re.match(rf"\s+{k}\s*:", ln)), "")
            source = line.split("#", 1)[1].strip() if "#" in line else ""
            lines.append(f"| `{m}` | `{k}` | `{v!r}` | {source.replace('|', '/')} |")
    return "\n".join(lines)


def methods() -> str:
    d = _load("methods")
    if d is None or "views" not in d:  # none yet, or the digits-only format of an older bench/methods.py
        return "(run bench/methods.py)"
    return methods_table(d)


def methods_table(d: dict) -> str:
    """bench/methods.py's results as markdown (what it prints, and the docs' block)."""
    base = next((r for r in d["rows"] if r["method"] == "simclr"), None)
    views = d["views"]
    data = {"fashion": "Fashion-MNIST", "digits": "digits"}.get(d["data"], d["data"])
    lines = [
        f"{data}, {d['train_images']:,} training images x {d['epochs']} epochs, batch {d['batch_size']}, "
        f"{views['image_size']} px (multi-crop: 2 x {views['image_size']} px + {views['local_views']} x "
        f"{views['local_image_size']} px), {d['backbone']}, one process with {d['threads']} threads and "
        f"{d['loader_workers']} DataLoader worker; top-1 on {d['test_images']:,} test images "
        f"({d['date'] if 'date' in d else 'bench/results/methods.json'}, {d['machine']['cpu_cores']} cores, "
        f"{d['machine']['gpu'] or 'no GPU'}):",
        "",
        "| method | kNN top-1 | linear probe top-1 | ms per step | step time vs SimCLR | RSS added by training (MiB) "
        "| peak RSS (MiB) | optimizer, lr per 256 | set for this data |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(d["rows"], key=lambda r: -r["probe_top1"]):
        s = r["settings"]
        rel = f"{r['ms_per_step'] / base['ms_per_step']:.2f}x" if base else ""
        sized = ", ".join(f"{k} {v}" for k, v in s["params"].items()) or ""
        lines.append(
            f"| `{r['method']}` | {r['knn_top1']:.3f} | {r['probe_top1']:.3f} | {r['ms_per_step']:.0f} | {rel} "
            f"| {r['training_rss_increase_mib']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {s['optimizer']} {s['lr_base']:g}, wd {s.get('weight_decay', 1e-6):g} "
            f"| {sized} |"
        )
    b = d["random_init"]
    lines.append(f"| random-init encoder | {b['knn_top1']:.3f} | {b['probe_top1']:.3f} | | | | | | |")
    below = [f"`{r['method']}`" for r in d["rows"] if r["probe_top1"] < b["probe_top1"]]
    if below:
        lines += ["", f"Below the random-init encoder's linear probe after this budget: {', '.join(below)}."]
    return "\n".join(lines)


def scale() -> str:
    """bench/scale.py (peak RSS per stage at two sizes), bench/shard_rate.py (the shard
    stage against tar) and bench/e2e.py (the pretrain stage against a plain loop)."""
    out: list[str] = []
    d = _load("scale")
    if d is None:
        out.append("(memory: run bench/scale.py)")
    else:
        m = d["machine"]
        out += [
            f"Peak RSS (MB) per stage at two sizes of the same generated data ({d['date']}, {m['cpu_cores']} cores, "
            f"{m['gpu'] or 'no GPU'}; target: growth below {d['growth_limit']:.0%} for the driver and the largest "
            "Ray worker; Ray's daemons are shown, not checked):",
            "",
            "| source | images | stage | driver | largest worker | Ray daemons | below target |",
            "|---|---|---|---|---|---|---|",
        ]

        def cell(r: dict) -> str:
            g = "" if r["growth"] is None else f" ({r['growth']:+.1%})"
            return f"{r['small_mb']:.0f} -> {r['large_mb']:.0f}{g}"

        for src, res in d["sources"].items():
            a, b = res["sizes"]
            for name, row in res["stages"].items():
                out.append(
                    f"| {src} | {a:,} -> {b:,} | {name} | {cell(row['driver'])} | {cell(row['worker'])} "
                    f"| {cell(row['ray'])} | {'yes' if row['ok'] else '**no**'} |"
                )
    r = _load("shard_rate")
    out.append("")
    if r is None:
        out.append("(shard rate: run bench/shard_rate.py)")
    else:
        out += [
            f"The shard stage on {r['images']:,} JPEG files of {r['image_size']} px ({r['source_mb']:.0f} MB), "
            f"against `tar -cf` of the same files ({r['date']}):",
            "",
            "| side | seconds | images/s | MB/s | vs tar | shards per node |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, label in (
            ("tar", "tar -cf"),
            ("shard_folder", "shard stage, local folder"),
            ("shard_s3", "shard stage, S3 (SeaweedFS), 16 GETs in flight per task"),
            ("shard_s3_one_at_a_time", "shard stage, S3, one GET at a time"),
        ):
            if key in r:
                x = r[key]
                vs = f"{x['vs_tar']:.2g}x" if "vs_tar" in x else ""
                nodes = ", ".join(str(v) for v in x.get("nodes", {}).values())
                out.append(
                    f"| {label} | {x['seconds']:.1f} | {x['images_per_sec']:,.0f} | {x['mb_per_sec']:.1f} "
                    f"| {vs} | {nodes} |"
                )
    for name in ("e2e", "e2e_full", "e2e_full_rounds", "e2e_compile"):
        e = _load(name)
        if e is None and name in ("e2e_full_rounds", "e2e_compile"):  # optional: --repeats; compile and bf16
            continue
        out.append("")
        if e is None:
            out.append(
                f"(pretrain against a plain loop: run bench/e2e.py{' --samples 60000' if name != 'e2e' else ''})"
            )
            continue
        t = e.get("target", {})
        out += [
            f"The pretrain stage against a plain PyTorch loop, Fashion-MNIST, {e['plain']['train_images']:,} "
            f"training images x {e['epochs']} epochs, global batch {e['global_batch']} ("
            + (f"medians of {e['repeats']} rounds, each ratio within its round; " if e.get("repeats", 1) > 1 else "")
            + f"{e['date']}, "
            + (f"CPU flags {', '.join(e['machine']['cpu_flags'])}, " if e["machine"].get("cpu_flags") else "")
            + f"`bench/results/{name}.json`; target: images/s >= {t.get('images_per_sec_vs_plain', 1.0):.1f}x, wall "
            f"<= {t.get('wall_vs_plain', 1.1):.1f}x):",
            "",
            "| side | colour augmentation | images/s | vs plain | wall s | vs plain |",
            "|---|---|---:|---:|---:|---:|",
            f"| plain loop | DataLoader process | {e['plain']['images_per_sec']:.0f} | 1.00x "
            f"| {e['plain']['wall_seconds']:.0f} | 1.00x |",
        ]
        for side, st in e["stage"].items():
            each = st.get("images_per_sec_vs_plain_each")
            spread = f" ({', '.join(f'{x:.2f}' for x in each)})" if each else ""
            out.append(
                f"| stage: {side} | {'batched in the worker' if st['augment_on'] == 'device' else 'loader process'} "
                f"| {st['images_per_sec']:.0f} | {st['images_per_sec_vs_plain']:.2f}x{spread} "
                f"| {st['wall_seconds']:.0f} | {st['wall_vs_plain']:.2f}x |"
            )
    return "\n".join(out)


BLOCKS = {
    "scale": scale,
    "digits": digits,
    "digits_finetune": digits_finetune,
    "fashion": fashion,
    "method_defaults": method_defaults,
    "methods": methods,
}
PAGES = {
    "README.md": ("digits", "digits_finetune", "fashion"),
    "bench/README.md": ("methods", "scale"),
    "docs/methods.md": ("method_defaults", "methods"),
}


def render(text: str, names: tuple[str, ...] = PAGES["README.md"]) -> str:
    for name in names:
        fn = BLOCKS[name]
        pat = re.compile(rf"(<!-- bench:{name} -->\n)(?:.*?\n)?(<!-- /bench:{name} -->)", re.S)
        m = pat.search(text)
        if m is None:
            raise SystemExit(f"the markers <!-- bench:{name} --> ... <!-- /bench:{name} --> are missing")
        text = text[: m.start()] + m.group(1) + fn() + "\n" + m.group(2) + text[m.end() :]
    return text


def stale() -> list[str]:
    """The pages whose generated blocks differ from what the recorded runs render."""
    return [
        page for page, names in PAGES.items() if render((ROOT / page).read_text(), names) != (ROOT / page).read_text()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        bad = stale()
        for page in bad:
            print(f"{page} is stale: run .venv/bin/python bench/readme_tables.py")
        sys.exit(1 if bad else 0)
    for page, names in PAGES.items():
        path = ROOT / page
        path.write_text(render(path.read_text(), names))


if __name__ == "__main__":
    main()
