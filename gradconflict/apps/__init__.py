"""Applications: the command line (``gradconflict report | advise | demo``) and the demo it runs.

The top floor of the package: it may use every floor below and nothing imports it.

>>> from gradconflict.apps.cli import main
"""
