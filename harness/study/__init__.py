"""Studies: interventions x seeds as planned, resumable sets of trials, and their parents in MLflow."""
