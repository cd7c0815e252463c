"""The end-to-end demo: pipeline.py runs the stages, report.py writes the page."""
