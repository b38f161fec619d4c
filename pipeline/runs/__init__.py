"""Runs and the registry, one job per module: ``store`` (the URI, errors vs absences,
retries), ``spec`` (what a run is called and what changed), ``tracking`` (run lifecycle and
logging), ``notes`` (what people read), ``lock`` (the promotion lock), ``registry``
(versions, aliases, the gate) and ``run_model`` (a registered model in a fresh process)."""
