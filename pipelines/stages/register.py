"""register: the encoder, the teacher and the student in the MLflow model registry.

Each model was logged once, by the stage that trained it (pretrain, finetune, distill),
with :func:`pipelines.models.log_model` (its ``state_dict`` and a JSON recipe of its
architecture, so loading it unpickles nothing; signature and input example from real val
images, preprocessed as at training time; pinned requirements and the ``cl_core`` code).
This stage registers those logged models as a new version of ``NAME-encoder`` /
``NAME-teacher`` / ``NAME-student``, each model and version with a description. The version is
tagged with its lineage (pipeline run, stage run, shard manifest sha256, label fraction,
seed) and its test metrics, gets alias ``candidate``, and takes alias ``champion`` only
if there is none, or if the champion was trained on the same data (equal shard manifest
sha256) and its test top-1 is beaten: test sets of other data are not comparable. The
read, compare and set happen under a lease on the model name (``pipelines.leases``), so
two runs that register at once cannot both read the old champion. Load one with
``pipelines.models.load_model("models:/NAME-student@champion")`` (a torch module) or
``mlflow.pyfunc.load_model(...)`` (numpy in, numpy out).
"""

from __future__ import annotations

import contextlib
import io
import sys

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cl_core.data.shards import read_manifest, shard_urls
from cl_core.data.subsets import fraction_name
from pipelines import leases, models
from pipelines.config import RegisterConfig
from pipelines.console import console
from pipelines.graph import StageContext
from pipelines.stages._pretraining import load_encoder
from pipelines.stages._train import input_example, load_classifier

METRIC_TAG = "test_top1"
STAGE_OF = {"encoder": "pretrain", "teacher": "finetune", "student": "distill"}
SHA_TAG = "clpipe.manifest_sha256"


def _champion(client: MlflowClient, name: str) -> tuple[str | None, float | None, str | None]:
    """(version, test top-1, shard manifest sha256) of ``name``'s champion; Nones without one."""
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None, None
    value = mv.tags.get(METRIC_TAG)
    return mv.version, float(value) if value is not None else None, mv.tags.get(SHA_TAG)


def _register(client: MlflowClient, model_uri: str, name: str, about: str, description: str) -> str:
    """A new version of ``name`` (created, described by ``about``, if new) for the logged
    model ``model_uri``, described by ``description``; MLflow's own "registered" and
    "created version" prints are left out (the stage prints its line)."""
    try:
        client.create_registered_model(name, description=about)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        mv = mlflow.register_model(model_uri, name)
    for line in quiet.getvalue().splitlines():  # anything else MLflow says still shows
        if not line.startswith(("Successfully registered model", "Created version")):
            print(line, file=sys.stderr)
    client.update_model_version(name, mv.version, description=description)
    return str(mv.version)


def register(ctx: StageContext, cfg: RegisterConfig, inputs: dict) -> dict:
    if not cfg.enabled:
        console.print("register: disabled (register.enabled: false)")
        return {"versions": {}}
    shard_set, subsets, ev = inputs["shard"], inputs["labels"]["subsets"], inputs["evaluate"]
    fraction = cfg.label_fraction if cfg.label_fraction is not None else max(s["fraction"] for s in subsets.values())
    frac_name = fraction_name(fraction)
    row = next((r for r in ev["rows"] if r["label_fraction"] == fraction), None)
    if row is None or "student" not in row or "teacher" not in row:
        raise ValueError(
            f"register: evaluate run {ctx.upstream_run_ids.get('evaluate')} has no teacher/student results "
            f"for label fraction {fraction}"
        )
    image_size = inputs["pretrain"]["image_size"]
    teacher = inputs["finetune"]["models"][f"teacher_{frac_name}"]
    student = inputs["distill"]["models"][f"student_{frac_name}"]
    # role: (the training stage's record, builder that rebuilds its architecture, test top-1, extra metric tags)
    roles = {
        "encoder": (
            inputs["pretrain"],
            {"kind": "encoder", "model": inputs["pretrain"]["model"]},
            row["encoder_linear"],
            {"test_knn_top1": row["encoder_knn"], "test_linear_top1": row["encoder_linear"]},
        ),
        "teacher": (teacher, {"kind": "classifier", "spec": teacher["spec"]}, row["teacher"], {}),
        "student": (student, {"kind": "classifier", "spec": student["spec"]}, row["student"], {}),
    }
    method = inputs["pretrain"]["model"]["method"]
    about = {
        "encoder": f"clpipe: the {method} encoder (images -> features) of the pretrain stage",
        "teacher": f"clpipe: the {method} encoder fine-tuned with a linear layer on a labeled subset (the teacher)",
        "student": "clpipe: the student distilled from the teacher on the unlabeled images",
    }
    about = {
        k: v + "; one version per pipeline run, alias candidate = the latest, champion = the best test top-1 "
        "on the same data"
        for k, v in about.items()
    }
    stage_runs = {
        "encoder": ctx.upstream_run_ids["pretrain"],
        "teacher": ctx.upstream_run_ids["finetune"],
        "student": ctx.upstream_run_ids["distill"],
    }
    client = MlflowClient()
    base = cfg.model_name or ctx.env.pipeline  # (the pipeline sets it: the config's model_name())
    versions = {}
    example = None
    for role, (record, builder, test_top1, extra) in roles.items():
        name = f"{base}-{role}"
        test_top1 = round(float(test_top1), 6)  # compared with the champion's tag, which holds 6 decimals
        model_uri = record.get("model_uri")
        if model_uri is None:  # a stage run cached from before the training stages logged their models
            if example is None:
                manifest = read_manifest(shard_set["shard_dir"])
                urls = (
                    shard_urls(shard_set["shard_dir"], manifest, "val")[0]
                    or shard_urls(shard_set["shard_dir"], manifest, "test")[0]
                )
                example = input_example(urls, image_size)
            module = load_encoder(record) if role == "encoder" else load_classifier(record)
            model_uri = models.log_model(module, name=role, builder=builder, input_example=example).model_uri
        version = _register(
            client,
            model_uri,
            name,
            about[role],
            f"pipeline {ctx.env.pipeline}, run {ctx.parent_run_id}, seed {ctx.seed}, {fraction:.0%} of "
            f"the labels: test top-1 {test_top1:.4f} (logged by {STAGE_OF[role]} run {stage_runs[role]})",
        )
        tags = {
            "clpipe.pipeline_run_id": ctx.parent_run_id,
            "clpipe.stage_run_id": stage_runs[role],
            "clpipe.register_run_id": ctx.run_id,
            SHA_TAG: shard_set["manifest_sha256"],
            "label_fraction": f"{fraction:g}",
            "seed": str(ctx.seed),
            "image_size": str(image_size),
            "preprocessing": f"cl_core.augment.EvalTransform({image_size})",
            METRIC_TAG: f"{test_top1:.6f}",
            **{k: f"{v:.6f}" for k, v in extra.items()},
        }
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.set_registered_model_alias(name, "candidate", version)
        sha = shard_set["manifest_sha256"]
        with leases.lease(leases.root_for(ctx.env), f"registry-{name}", say=console.print):  # compare-and-set
            champ_version, champ_top1, champ_sha = _champion(client, name)
            same_data = champ_sha == sha
            promoted = champ_version is None or (same_data and (champ_top1 is None or test_top1 > champ_top1))
            if promoted:
                client.set_registered_model_alias(name, "champion", version)
        versions[role] = {
            "name": name,
            "version": version,
            "test_top1": test_top1,
            "champion": promoted,
            "previous_champion": champ_version,
            "uri": f"models:/{name}/{version}",
        }
        if promoted:
            why = ", champion"
        elif not same_data:
            why = (
                f"; champion stays version {champ_version}: it was trained on other data (shard manifest "
                f"{(champ_sha or 'unknown')[:12]}, this one {sha[:12]}), so test top-1 is not comparable; "
                f"promote by hand if wanted (MlflowClient().set_registered_model_alias({name!r}, 'champion', "
                f"{version!r}))"
            )
        else:
            why = f"; champion stays version {champ_version} ({champ_top1:.4f})"
        console.print(f"register: {name} version {version} (test top-1 {test_top1:.4f}): candidate{why}")
    mlflow.log_dict(versions, "registered.json")
    return {"versions": versions, "label_fraction": fraction}
