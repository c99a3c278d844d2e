"""From a run's records to baseline entries: the payload a finished case contributes to its baseline file, and
the recovery of a recording run's baselines from its results file (`dflash baselines --from-run`)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import DFlashError
from .baselines import PER_QUERY_KEYS, THROUGHPUT_SAMPLES, write_baseline_payloads
from .family import get_family
from .results import ResultsFile, latest_by_id
from .runs import RUN_FILE, identity_digest, record_problem

def baseline_payload(record: dict) -> dict:
    """A case's baseline entry from its results record: per-prompt taus (or, for a method that is not lossless,
    per-query correctness), raw counters, the code it ran, fingerprint, provenance, the published figures that
    describe this case (GPU profiles), and its throughput samples under the testbed that measured them."""
    metrics, references, fingerprint = record["metrics"], record.get("references") or [], record["fingerprint"]
    recorded = time.strftime("%F %T")
    kind = get_family(record["ablation_family"]).baseline_kind
    outcomes = kind == "outcomes"
    samples = metrics["per_query"]["cost"] if outcomes else metrics["speedup_samples"]
    common = {"profile": record["profile"], "ablation": record["ablation"], "id": record["id"],
              "code": fingerprint["code"], "fingerprint": fingerprint,
              "throughput": {fingerprint["testbed"]: {THROUGHPUT_SAMPLES[kind]: samples,
                                                      "fingerprint": fingerprint, "code": fingerprint["code"],
                                                      "recorded": recorded}}}
    provenance = {"command": "pytest ablations --update-baselines", "recorded": recorded,
                  "run_identity": record.get("identity")}
    if outcomes:
        return {**common, "kind": "outcomes",
                "per_query": {k: metrics["per_query"][k] for k in PER_QUERY_KEYS},
                "provenance": {**provenance, "queries": len(metrics["per_query"]["qids"])}}
    return {
        **common, "per_prompt_tau": metrics["per_prompt_tau"],
        "counters": {k: metrics[k] for k in ("committed_tokens", "cycles", "hit_cap") if k in metrics},
        "provenance": {**provenance, "prompts": len(metrics["per_prompt_tau"]),
                       "clock": metrics.get("speedup_clock", "wall")},
        "reference": {"figures": references, "source": "; ".join(r["source"] for r in references)}
        if references else None,
    }


def baselines_from_run(run_dir: str | Path, baselines_dir: str | Path, ablations=None, *, write: bool = False) -> str:
    """Baselines from a run's results file: recovers a recording (`--update-baselines`) that was killed before
    its session ended, since every finished case was already appended there. Only a recording run qualifies
    (its run.json says --update-baselines, with the profile's own target and draft), and only records of that
    identity that did not fail. Returns the diff; writes only with `write=True`."""
    run_dir = Path(run_dir)
    results = ResultsFile(run_dir / "results.jsonl")
    if not results.path.exists():
        raise DFlashError(f"{results.path} does not exist: pass a run directory under reports/ that has a "
                          "results.jsonl (e.g. reports/tiny-20261125-145546).")
    try:
        identity = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = None
    if not isinstance(identity, dict) or not isinstance(identity.get("options", {}), dict):
        raise DFlashError(f"{run_dir} has no readable {RUN_FILE}: what it measured is unknown, so it cannot become "
                          "a baseline. Re-record with pytest ablations --update-baselines.")
    if not identity.get("options", {}).get("update_baselines"):
        raise DFlashError(f"{run_dir} is not a baseline recording (it ran without --update-baselines, so it "
                          "measured the gated prompt count, not the cap). Re-record with pytest ablations "
                          "--update-baselines.")
    if identity.get("overrides"):
        raise DFlashError(f"{run_dir} overrode the profile's {' and '.join(map(str, identity['overrides']))} "
                          f"({identity.get('target')}, {identity.get('draft')}); baselines are recorded with the "
                          "profile's own models.")
    digest, payloads, left_out = identity_digest(identity), [], []
    for record in latest_by_id(results.load(check=record_problem)).values():  # names a bad file and line
        if ablations and record["ablation"] not in ablations:
            continue
        if record.get("identity") != digest or not record.get("recording"):
            raise DFlashError(f"{record['id']} in {results.path} was not recorded by this run's recording "
                              f"(identity {record.get('identity')!r}, expected {digest!r}).")
        if record.get("outcome") == "failed":
            left_out.append(record["id"])
            continue
        payload = baseline_payload(record)
        payload["provenance"]["command"] += f" (recovered from {results.path})"
        payloads.append(payload)
    baselines_dir = Path(baselines_dir)
    if baselines_dir.exists() and not baselines_dir.is_dir():
        raise DFlashError(f"--baselines-dir {baselines_dir} is a file, not a directory: pass the baselines directory.")
    try:
        diff = write_baseline_payloads(baselines_dir, payloads, dry_run=not write)
    except OSError as error:
        raise DFlashError(f"the baselines could not be written to {baselines_dir} ({error.strerror or error}"
                          f"{': ' + str(error.filename) if error.filename else ''}); every file there is as it was "
                          f"and {results.path} is untouched. Make the directory writable (or free space) and run "
                          "this again.") from None
    if left_out:
        diff += "\nleft out (failed cases): " + ", ".join(left_out)
    return diff
