"""Rendering: rich tables, terminal histograms and (optional) matplotlib figures."""
