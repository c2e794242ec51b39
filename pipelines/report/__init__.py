"""The run report: a run directory read (collect.py) and drawn as one self-contained HTML page
(page.py). The top layer: it may read every other one.
"""
