"""Reporting: a run told to a person, as text, figures and one HTML page.

Floor 8 of the package. :mod:`~gradconflict.reporting.summary` condenses a run, :mod:`~gradconflict.reporting.plots`
draws it (matplotlib, loaded on first use), :mod:`~gradconflict.reporting.html` writes the page and
:mod:`~gradconflict.reporting.notebook` draws the page's tables for one report, advice, comparison or split
evaluation in a notebook (their ``_repr_html_``). Text is
rendered here, at the edge, from the structured records and advice below; nothing below parses it back.

>>> from gradconflict.reporting import summary
"""
