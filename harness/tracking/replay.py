"""`python -m harness replay RUN_DIR`'s work: send the records a trial could not deliver (its unsent_records.jsonl)
to the store, in order, keeping what is still unsent for the next attempt."""

import json
import time
from pathlib import Path

from harness.tracking.liveness import REASON_TAG, WITHDRAWN_TAG, describe, is_live, trial_runs
from harness.tracking.store import UNSENT_FILE, connect, normalize_uri, public_uri, transient
from harness.tracking.tracker import send


def replay(run_dir: Path, uri: str | None = None, timeout: float = 10.0) -> str:
    """Send `<run_dir>/unsent_records.jsonl` to the store, in order. A study trial whose computation another
    run FINISHED meanwhile (this one was marked KILLED while silent) ends withdrawn instead of FINISHED."""
    from mlflow.exceptions import MlflowException

    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: nothing to replay")
    header, *records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    uri = normalize_uri(uri or header["uri"])
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(
            f"no MLflow store at {uri}: replay into the store the trial logged to (tracking.uri=URI)"
        )
    client = connect(uri, timeout)
    run_id, uri = header["run_id"], public_uri(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise FileNotFoundError(
            f"run {run_id} of {path} is not in {uri}: replay into the store the trial logged to "
            f"(tracking.uri=URI or MLFLOW_TRACKING_URI)"
        ) from None
    sent = 0
    try:
        for record in records:
            kind, payload = record["kind"], record["payload"]
            if kind == "end" and payload["status"] == "FINISHED":
                superseded = _superseded(client, run)
                if superseded:
                    send(client, run_id, "tags", {REASON_TAG: f"withdrawn: {superseded}", WITHDRAWN_TAG: "true"})
                    payload = {**payload, "status": "KILLED"}
            send(client, run_id, kind, payload)
            sent += 1
    except Exception as error:
        with open(path, "w") as f:  # keep what is left, for the next attempt
            for line in [header, *records[sent:]]:
                f.write(json.dumps(line) + "\n")
        still = "unreachable" if transient(error) else "refusing them"
        raise RuntimeError(
            f"sent {sent} of {len(records)} records of run {run_id} to {uri}; the store is {still} "
            f"({str(error).splitlines()[0][:300]}); the rest stay in {path}"
        ) from None
    done = path.with_name(f"replayed_records-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    path.rename(done)
    status = client.get_run(run_id).info.status
    return f"sent {sent} records of run {run_id} to {uri}; the run is {status}; the file is kept as {done}"


def _superseded(client, run) -> str | None:
    tags = run.data.tags
    if "study" not in tags or "claim_slots" not in tags:
        return None
    now = time.time()
    others = [
        r
        for r in trial_runs(client, run.info.experiment_id, tags["study"], tags["config_hash"])
        if r.info.run_id != run.info.run_id and r.info.status == "FINISHED" and is_live(r, now)
    ]
    if len(others) < int(tags["claim_slots"]):
        return None
    return "superseded while its records were unsent: " + "; ".join(describe(r, now) for r in others)
