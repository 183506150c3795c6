"""Closed-loop evaluation: policies run in simulation (runner.py), what they are (policies.py), and what a
run of trials writes (report.py: results.json, a Markdown table, videos, a bar chart)."""
