"""The data watch: is the data, or the traffic, still what the production model learned?

data.py reads the watched source, the recent traffic and the production model's own training
rows (from its MLflow run); check.py compares them (new rows; label balance, text length and
embedding drift: tasks/common/drift.py) and decides which events to emit; report.py writes the
drift report. flows/watch.py runs it on a schedule and emits the events.
"""
