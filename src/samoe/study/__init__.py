"""Studies: grids of runs (grid.py) and their generated reports (report.py)."""
