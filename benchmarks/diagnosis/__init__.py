"""The diagnosis benchmark: is the advice right on problems whose answer is fixed before any run?

``python -m benchmarks.diagnosis.run`` (``--help`` for the options) trains each problem of
:data:`gradconflict.fixtures.synthetic.FAMILY` under a ConflictMonitor and asks for the advice
(:mod:`.advice_run`), measures
what splitting actually does with ``compare()`` over several seeds (:mod:`.truth`), and writes the confusion
matrices to ``benchmarks/DIAGNOSIS.md`` (:mod:`.report`).
"""
