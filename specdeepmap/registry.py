"""MLflow model registry: champion/challenger promotion by test mean IoU on the same chips.

A model version's test score is kept as its tag ``test_mean_iou``. A new version becomes
``champion`` only if there is none yet, or if it beats the current champion *scored on the new
run's test chips* by a margin, and it is not below the per-pixel RandomForest baseline scored on
those chips (tag ``below_baseline``); otherwise it becomes ``challenger``. Who moved an alias,
when and why is kept as version tags (``champion_by``, ``champion_since``, ``champion_reason``,
``champion_comment``). Reviewers move aliases with approval (:mod:`flows`), ``specdeepmap
promote`` (:func:`promote_by_hand`, the same checks) or by hand in the MLflow UI.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass

from specdeepmap.comparison import Difference, paired_bootstrap
from specdeepmap.errors import InputMismatchError
from specdeepmap.params import EvaluateParams

CHAMPION, CHALLENGER = "champion", "challenger"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Which alias a new version earns, and why (shown to reviewers)."""

    alias: str
    reason: str


@dataclass(frozen=True)
class ChampionScore:
    """The current champion scored on the new run's test chips (:func:`score_champion`).

    ``mean_iou`` is None, and ``reason`` says why, when there is no champion or it cannot be
    scored on those chips; ``difference`` is the new model's mean IoU minus the champion's
    with its interval over the chips (given the new model's per-chip matrices).
    """

    version: str | None
    mean_iou: float | None
    reason: str = ""
    difference: Difference | None = None


@dataclass(frozen=True)
class Promotion:
    """The alias a version got after training, why, and the comparison a reviewer reads."""

    alias: str | None  #: None where the pipeline only registers (mode ``none``)
    reason: str
    comparison: str = ""


def decide(
    test_mean_iou: float,
    baseline_mean_iou: float | None = None,
    champion_version: str | None = None,
    champion_mean_iou: float | None = None,
    min_improvement: float = 0.0,
) -> Decision:
    """The promotion rule, on scores measured on the *same* test chips.

    A version below the RandomForest baseline is never champion; the first version is; a
    later one must beat the champion by ``min_improvement``. Without the champion's score on
    the same chips the champion stays (a number measured on other chips proves nothing).
    """
    if _known(baseline_mean_iou) and test_mean_iou < baseline_mean_iou:
        return Decision(
            CHALLENGER,
            f"test mean IoU {test_mean_iou:.4f} is below the "
            f"RandomForest baseline's {baseline_mean_iou:.4f}",
        )
    if champion_version is None:
        return Decision(CHAMPION, "no champion yet")
    if not _known(champion_mean_iou):
        return Decision(
            CHALLENGER,
            f"champion version {champion_version} could not be scored on the same test chips",
        )
    if test_mean_iou >= champion_mean_iou + min_improvement:
        return Decision(
            CHAMPION,
            f"beats champion version {champion_version} "
            f"({champion_mean_iou:.4f}) by {test_mean_iou - champion_mean_iou:.4f}"
            f" >= {min_improvement:.4f} on the same test chips",
        )
    return Decision(
        CHALLENGER,
        f"does not beat champion version {champion_version} "
        f"({champion_mean_iou:.4f}) by {min_improvement:.4f} on the same test chips",
    )


def _known(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def record_scores(
    name: str,
    version: str,
    test_mean_iou: float,
    baseline_mean_iou: float | None = None,
    champion_version: str | None = None,
    champion_mean_iou: float | None = None,
    client=None,
) -> None:
    """Keep the comparison as version tags (the MLflow UI shows them on the version's page)."""
    client = _client(client)
    tags = {"test_mean_iou": f"{test_mean_iou:.6f}"}
    if _known(baseline_mean_iou):
        tags |= {
            "baseline_rf_test_mean_iou": f"{baseline_mean_iou:.6f}",
            "below_baseline": str(test_mean_iou < baseline_mean_iou).lower(),
        }
    if (
        champion_version is not None
        and champion_version != str(version)
        and _known(champion_mean_iou)
    ):
        tags |= {
            "champion_test_mean_iou_same_chips": f"{champion_mean_iou:.6f}",
            "compared_with_version": str(champion_version),
        }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


#: a version holds at most one of these: champion and challenger exclude each other
EXCLUSIVE = {CHAMPION: CHALLENGER, CHALLENGER: CHAMPION}
#: version tag keeping the aliases a version held before, with who, when and why (JSON list)
ALIAS_HISTORY = "alias_history"


def set_alias(
    name: str, version: str, alias: str, reason: str, by: str = "", comment: str = "", client=None
) -> None:
    """Move ``alias`` to ``version`` and record who, when and why as version tags.

    ``champion`` and ``challenger`` are exclusive: the version gives up the other one, and
    the ``ALIAS_*`` tags of an alias a version no longer holds (the other one, or this one on
    the version it moves from) move into its ``alias_history`` tag.
    """
    client = _client(client)
    previous = _holder(client, name, alias)
    client.set_registered_model_alias(name, alias, version)
    if previous is not None and previous != str(version):
        _retire(client, name, previous, alias)
    other = EXCLUSIVE.get(alias)
    if other is not None:
        if _holder(client, name, other) == str(version):
            client.delete_registered_model_alias(name, other)
        _retire(client, name, str(version), other)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tags = {f"{alias}_since": stamp, f"{alias}_reason": reason}
    if by:
        tags[f"{alias}_by"] = by
    if comment:
        tags[f"{alias}_comment"] = comment
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])
    from specdeepmap.mlm import refresh_model_item

    for changed in {str(version), previous} - {None}:  # their MLM items name their aliases
        refresh_model_item(name, changed, client)


def _holder(client, name: str, alias: str) -> str | None:
    """The version holding ``alias`` (None: no version does)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _retire(client, name: str, version: str, alias: str) -> None:
    """Move a version's ``ALIAS_*`` tags into its alias history (it no longer holds it)."""
    import json

    tags = client.get_model_version(name, version).tags
    stale = {k: v for k, v in tags.items() if k.startswith(f"{alias}_")}
    if not stale:
        return
    history = json.loads(tags.get(ALIAS_HISTORY) or "[]")
    history.append({"alias": alias} | {k[len(alias) + 1 :]: v for k, v in stale.items()})
    while len(json.dumps(history)) > 5000 and len(history) > 1:  # MLflow's tag value limit
        history.pop(0)
    client.set_model_version_tag(name, version, ALIAS_HISTORY, json.dumps(history)[:5000])
    for key in stale:
        client.delete_model_version_tag(name, version, key)


def promote_if_better(
    name: str,
    version: str,
    test_mean_iou: float,
    baseline_mean_iou: float | None = None,
    champion_mean_iou: float | None = None,
    min_improvement: float = 0.0,
    mode: str = "auto",
    client=None,
) -> Decision:
    """Tag ``version`` with its scores and apply :func:`decide`; return the decision.

    ``champion_mean_iou`` is the current champion's pooled test mean IoU on the *same* test
    chips as ``test_mean_iou`` (see :func:`score_champion`). ``mode``: ``auto`` gives the
    version the decided alias; ``approval`` gives it ``challenger`` until a reviewer decides
    (the decision is what the rule advises); ``none`` sets no alias.
    """
    client = _client(client)
    current = champion_version(name, client)
    if current == str(version):
        current = None
    record_scores(
        name, version, test_mean_iou, baseline_mean_iou, current, champion_mean_iou, client
    )
    decision = decide(test_mean_iou, baseline_mean_iou, current, champion_mean_iou, min_improvement)
    if mode == "auto":
        set_alias(
            name, version, decision.alias, decision.reason, by="training pipeline", client=client
        )
    elif mode == "approval":
        set_alias(
            name,
            version,
            CHALLENGER,
            f"waiting for a reviewer; the rule says {decision.alias}: {decision.reason}",
            by="training pipeline",
            client=client,
        )
    return decision


def champion_version(name: str, client=None) -> str | None:
    """The version that holds ``champion`` (None when no version does)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(client).get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def score_champion(
    name: str,
    test_csv: str,
    new_model_uri: str,
    out_folder: str,
    device: str = "auto",
    client=None,
    new_chip_matrices: dict | None = None,
    chip_units: dict | None = None,
) -> ChampionScore:
    """Score the current champion on the new run's test chips with the Tester's code.

    The score's ``mean_iou`` is None (and ``reason`` says why) when there is no champion or
    its input contract (bands, class values) differs from the new model's, since then the two
    cannot be scored on the same chips. Given the new model's per-chip confusion matrices
    (``Metrics.chip_matrices``, or the Tester's ``chip_confusion_matrices``), ``difference``
    is the new model's mean IoU minus the champion's with its bootstrap interval over the
    chips, else None. Nothing is logged to the champion's own MLflow run (its figures there
    stay those of its own test set).
    """
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.inference import read_model_file

    version = champion_version(name, client)
    if version is None:
        return ChampionScore(None, None, "no champion yet")
    champion_uri = f"models:/{name}/{version}"  # named so in the champion's test report
    champion, _ = read_model_file(champion_uri)
    new, _ = read_model_file(new_model_uri)
    for key in ("in_channels", "class_values"):
        if getattr(champion, key) != getattr(new, key):
            return ChampionScore(
                version,
                None,
                f"champion version {version} has {key} = {getattr(champion, key)}, "
                f"the new model {getattr(new, key)}: they cannot be scored on the same chips",
            )
    report = evaluate_model(
        test_csv, champion_uri, out_folder, EvaluateParams(device=device), log_to_mlflow=False
    )
    difference = None
    if new_chip_matrices:
        try:
            difference = paired_bootstrap(
                new_chip_matrices,
                report.metrics.chip_matrices or {},
                units=chip_units or report.metrics.chip_units,
            )
        except InputMismatchError as error:  # the new model's figures are for other chips
            log.warning("No interval for the difference with the champion: %s", error)
    return ChampionScore(version, report.metrics.mean_iou, difference=difference)


def promote_by_hand(
    name: str,
    version: str,
    out_folder: str,
    alias: str = CHAMPION,
    by: str = "",
    comment: str = "",
    force: bool = False,
    min_improvement: float = 0.01,
    device: str = "auto",
    client=None,
) -> Decision:
    """Move ``alias`` to a version by hand, with the training pipeline's checks for champion.

    For ``champion``: the version and the current champion are scored on the version's own
    test chips (``test_files.csv`` of its ``dataset`` tag) with the Tester's code and judged
    by :func:`decide` (margin, RandomForest baseline from the version's tags). A version that
    fails is refused unless ``force``; the reason is kept either way. Other aliases are set
    without checks. Returns the decision (its alias is what the rule says, not what was set).
    """
    from mlflow.exceptions import MlflowException

    from specdeepmap import storage
    from specdeepmap.errors import MissingInputError, PromotionRefusedError

    client = _client(client)
    try:
        found = client.get_model_version(name, str(version))
    except MlflowException:
        raise MissingInputError(f"Registered model {name} has no version {version}") from None
    if alias != CHAMPION:
        decision = Decision(alias, f"set by hand{': ' + comment if comment else ''}")
        set_alias(name, str(version), alias, decision.reason, by, comment, client)
        return decision
    dataset = found.tags.get("dataset", "")
    test_csv = storage.join(dataset, "test_files.csv") if dataset else ""
    digest = found.tags.get("dataset_digest") or (
        client.get_run(found.run_id).data.tags.get("dataset_digest") if found.run_id else None
    )  # versions registered before the tag
    changed = _dataset_changed(dataset, digest) if test_csv and storage.exists(test_csv) else None
    if not test_csv or not storage.exists(test_csv):
        decision = Decision(
            CHALLENGER,
            f"its test chips ({test_csv or 'no dataset tag'}) are "
            "not available to compare it with the champion",
        )
    elif changed:
        decision = Decision(CHALLENGER, changed)
    else:
        decision = _judge_on_test_chips(
            found, test_csv, out_folder, min_improvement, device, client
        )
    if decision.alias != CHAMPION and not force:
        raise PromotionRefusedError(
            f"{name} version {version} is not made champion: "
            f"{decision.reason} (force to promote it anyway)"
        )
    reason = decision.reason if decision.alias == CHAMPION else f"forced: {decision.reason}"
    set_alias(name, str(version), CHAMPION, reason, by, comment, client)
    return decision


def _judge_on_test_chips(
    found, test_csv: str, out_folder: str, min_improvement: float, device: str, client
) -> Decision:
    """Score a version and the champion on the version's test chips and judge by
    :func:`decide`; the paired interval against the champion and a leaking split are
    added to the reason.
    """
    from specdeepmap import storage
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.leakage import read_split_leakage

    name, version = found.name, str(found.version)
    model_uri = f"models:/{name}/{version}"
    metrics = evaluate_model(
        test_csv,
        model_uri,
        storage.join(out_folder, f"v{version}"),
        EvaluateParams(device=device),
        log_to_mlflow=False,
    ).metrics
    current = champion_version(name, client)
    champion = ChampionScore(None, None)
    if current is not None and current != version:
        champion = score_champion(
            name,
            test_csv,
            model_uri,
            storage.join(out_folder, "champion"),
            device,
            client,
            new_chip_matrices=metrics.chip_matrices,
        )
    baseline = found.tags.get("baseline_rf_test_mean_iou")
    baseline = float(baseline) if baseline else None
    record_scores(
        name, version, metrics.mean_iou, baseline, champion.version, champion.mean_iou, client
    )
    decision = decide(
        metrics.mean_iou, baseline, champion.version, champion.mean_iou, min_improvement
    )
    reasons = [decision.reason]
    if champion.difference:  # how sure the chips make it, beside the rule's reason
        reasons.append(champion.difference.sentence(f"version {version}", "the champion"))
    leakage = read_split_leakage(found.tags.get("dataset", ""))
    if leakage is not None and leakage.leaks:  # how honest those figures are
        reasons.append(f"the split leaks: {leakage.sentence()}")
    return Decision(decision.alias, "; ".join(reasons))


def _dataset_changed(dataset: str, digest: str | None) -> str | None:
    """Why a version cannot be scored on the dataset its tag names, or None.

    A reason is given when the chips or the split there changed since the version was trained
    (another digest).
    """
    from specdeepmap.model_card import dataset_facts

    if not digest:
        return None
    now = dataset_facts(dataset)["digest"]
    if now == digest:
        return None
    return (
        f"its dataset {dataset} changed since it was trained (digest {digest}, now {now}):"
        " its test chips are not the ones it was trained beside, so it cannot be scored "
        "on them"
    )


def _client(client=None):
    import mlflow

    return client or mlflow.MlflowClient()


def resolve(model_uri: str, client=None) -> str:
    """Pin ``models:/NAME@ALIAS`` to ``models:/NAME/VERSION`` (other URIs unchanged).

    A scheduled run pins the alias once, so every scene of the run uses the same version even
    if a reviewer moves the alias meanwhile.
    """
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    import mlflow

    client = client or mlflow.MlflowClient()
    name, alias = model_uri[len("models:/") :].split("@", 1)
    version = client.get_model_version_by_alias(name, alias)
    return f"models:/{name}/{version.version}"


def registered_version(model_uri: str, client=None) -> tuple[str, str] | None:
    """(name, version) of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI (an alias
    pinned to the version it names now); None for a model file or a logged model's id.
    """
    if not model_uri.startswith("models:/"):
        return None
    pinned = resolve(model_uri, client).removeprefix("models:/")
    if "/" not in pinned:  # a logged model's id, not a registered version
        return None
    name, version = pinned.split("/", 1)
    return name, version


def registered_artifact(model_uri: str, tag: str, artifact: str) -> str | None:
    """The local copy of a registered version's run artifact ``artifact`` (downloaded with
    the rest of its folder: an OpenVINO ``.xml`` needs its ``.bin``) where the version's
    ``tag`` names it; None where it does not or ``model_uri`` is no registered version
    (``models:/NAME/VERSION`` or ``@ALIAS``).
    """
    if not model_uri.startswith("models:/"):
        return None
    import mlflow

    client = mlflow.MlflowClient()
    registered = registered_version(model_uri, client)
    if registered is None:  # a model file, or a logged model's id
        return None
    found = client.get_model_version(*registered)
    if found.tags.get(tag) != artifact:
        return None
    folder, name = os.path.split(artifact)
    local = mlflow.artifacts.download_artifacts(
        run_id=found.run_id, artifact_path=folder, tracking_uri=mlflow.get_tracking_uri()
    )
    return os.path.join(local, name)
