"""The independent diagnosis benchmark (issue 19): is the advice right on problems nobody tuned it for?

A second set of problems, built differently from :data:`gradconflict.fixtures.synthetic.FAMILY`
(:mod:`.problems`: scikit-learn's bundled digits and breast-cancer data, MLP, conv and transformer backbones,
learnable heads, 2 to 4 tasks with group structure, label noise, a 100x loss scale, capacity limits, late and
transient conflict, compatible controls). The truth of each problem is measured by training every variant with
this benchmark's own training loop and paired statistics over several seeds (:mod:`.truth`, cached in
``truth.json``); the advice is what a user gets from a monitored shared run, at first look and after running its
``next_step`` (:mod:`.advice`); the hit rates and a per-problem table go into their own section of
``benchmarks/DIAGNOSIS.md`` (:mod:`.report`).

    nice -n 10 python -m benchmarks.diagnosis.independent.run              # truth where not cached, then advice
    python -m benchmarks.diagnosis.independent.run --advice-only           # the advice side only (minutes)
"""
