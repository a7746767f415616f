"""MLflow records of ``diprune run`` (the ``[mlflow]`` extra, imported here only, lazily).

One parent run per job (the config's main settings as params; the original's metrics, the number of candidates that
pass, the best candidate's metrics; ``report.json``, ``report.md``, the plots and ``best.onnx`` with its plan as
artifacts) and one child run per candidate (``mlflow.parentRunId`` tag; method, budget and recovery as params;
MACs/params fractions, top-1, its drop, agreement, latency and speedup per batch size, 1/0 per gate as metrics; the
pruned model, its plan and its report as artifacts). Everything goes through one ``MlflowClient`` bound to the
tracking URI (no global MLflow state). The default store is ``sqlite:///OUTPUT/mlflow.db`` with artifacts in
``OUTPUT/mlartifacts``. The parent run is opened before the work starts (a bad URI fails fast) and marked FAILED
when the job fails.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import UserInputError

MLFLOW_HINT = "pip install 'diprune[mlflow]' (MLflow, about 850 MB installed)"


def default_uri(output: Path) -> str:
    """The default tracking store: a sqlite file in the output folder."""
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise UserInputError(f"--mlflow needs MLflow, which is not installed: {MLFLOW_HINT}") from err
    return MlflowClient(tracking_uri=uri)


def _store_error(uri: str, err: Exception) -> UserInputError:
    hint = ""
    if uri.startswith("file:") or "://" not in uri:
        hint = " (MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true; the default sqlite store needs nothing)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserInputError(f"MLflow tracking store {uri} is not usable: {first}{hint}")


def _metrics(candidate: Mapping[str, Any]) -> dict[str, float]:
    values = {k: candidate.get(k) for k in ("macs_fraction", "params_fraction", "top1", "top5", "top1_drop",
                                             "agreement", "relative_logit_error")}
    for entry in candidate.get("latency", []):
        values[f"latency_ms_b{entry['batch']}"] = entry["median_ms"]
        values[f"speedup_b{entry['batch']}"] = entry["speedup"]
    values.update({f"gate_{name}": float(ok) for name, ok in candidate.get("passed", {}).items()})
    if "passed_all" in candidate:
        values["passed_all"] = float(candidate["passed_all"])
    return {k: float(v) for k, v in values.items() if v is not None}


class MlflowTracker:
    """The MLflow side of one job: opened before the work, filled in by :meth:`log_run`."""

    def __init__(self, uri: str, experiment: str, run_name: str, output: Path) -> None:
        """Connect, create (or reuse) the experiment and open the parent run."""
        self.uri = uri
        try:
            self.client = _client(uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                artifacts = (output / "mlartifacts").resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                                 tags={"diprune.kind": "run"}).info.run_id
        except UserInputError:
            raise
        except Exception as err:  # mlflow raises its own types and store-specific errors
            raise _store_error(uri, err) from err
        self.experiment = experiment
        self.children: dict[str, str] = {}

    def describe(self) -> dict[str, Any]:
        """Where the run is recorded (goes into report.json)."""
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id": self.experiment_id,
                "run_id": self.run_id}

    def _log(self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float],
             tags: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                              params=[Param(k, str(v)[:500]) for k, v in params.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _child(self, candidate: Mapping[str, Any], output: Path) -> str:
        run_id = self.client.create_run(self.experiment_id, run_name=candidate["name"],
                                        tags={"mlflow.parentRunId": self.run_id, "diprune.kind": "candidate"}
                                        ).info.run_id
        params = {"method": candidate["method"], "target_kind": candidate["target"]["kind"],
                  "target": candidate["target"]["fraction"], "recover": candidate["recover"]}
        self._log(run_id, params, _metrics(candidate), {"passed": candidate["passed_all"],
                                                        "pareto_macs": candidate["pareto"]["macs"]})
        model = output / candidate["path"]
        for path in (model, Path(f"{model}.plan.json"), Path(f"{model}.report.json")):
            self.client.log_artifact(run_id, str(path), artifact_path="model")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_run(self, report: Any, output: Path) -> None:
        """Log the parent run's record and one child run per candidate, then close the parent run.

        Raises:
            UserInputError: the store failed (the report files are written already).
        """
        try:
            self._log_run(report.to_dict(), output)
        except Exception as err:  # mlflow raises its own types and store-specific errors
            raise UserInputError(f"logging to MLflow failed ({_store_error(self.uri, err)}); report.json and "
                                 "report.md are written") from err

    def _log_run(self, doc: dict[str, Any], output: Path) -> None:
        config = doc["config"]
        params = {"model": Path(doc["original"]["path"]).name, "methods": ",".join(config["prune"]["methods"]),
                  "target_macs": config["prune"]["target_macs"], "target_params": config["prune"]["target_params"],
                  "recover": config["prune"]["recover"], "backend": config["bench"]["backend"],
                  "batch": config["bench"]["batch"], **{f"gate_{k}": v for k, v in doc["gates"].items()}}
        best = next((c for c in doc["candidates"] if c["name"] == doc["best"]), None)
        metrics = {f"original_{k}": v for k, v in _metrics(doc["original"]).items()}
        metrics |= {"candidates": float(len(doc["candidates"])),
                    "candidates_passed": float(sum(c["passed_all"] for c in doc["candidates"])),
                    "exit_code": float(doc["exit_code"])}
        metrics |= {} if best is None else {f"best_{k}": v for k, v in _metrics(best).items()}
        self._log(self.run_id, params, metrics, {"best": doc["best"] or "none"})
        self.children = {c["name"]: self._child(c, output) for c in doc["candidates"]}
        for name in ("report.json", "report.md", "best.onnx", "best.onnx.plan.json"):
            if (output / name).is_file():
                self.client.log_artifact(self.run_id, str(output / name))
        if (output / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(output / "plots"), artifact_path="plots")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        """Mark the parent run FAILED (the job raised)."""
        self.client.set_terminated(self.run_id, "FAILED")
