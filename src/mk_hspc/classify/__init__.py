"""Classification of candidates: labels -> training sets -> gated models (MLflow) -> full-run counts.

Plain modules, no Kedro: ``labels`` (the labels contract, training sets), ``simulated`` (the demo's
annotator), ``training`` (estimators, grouped CV, gates, plots), ``tracking`` (MLflow runs, registry,
safe loading), ``results`` (probabilities, counts, plots, group tests), ``active`` (the next batch).
"""
