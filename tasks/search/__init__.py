"""The search stage: a budgeted Optuna study over training settings, trials tracked in MLflow.

space.py turns search.space into Optuna suggestions and trial configs; study.py opens the study
(RDB storage shared by every process that runs trials), counts its budget and picks the winner;
trial.py trains one trial as a nested MLflow run; report.py logs the trials table, plots and
tags; stage.py runs the whole search and hands the winner's adapter on.
"""
