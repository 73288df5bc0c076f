"""Plots (matplotlib) and self-contained HTML pages. Imports matplotlib only when used."""
