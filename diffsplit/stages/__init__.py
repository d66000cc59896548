"""The run and its stages: the run object (:mod:`.run`), stage 1 (:mod:`.precompute`), the entry points over a
run (:mod:`.entrypoints`: unsplit, stage 1, stage 2, automatic, plan) and plan's memory estimate
(:mod:`.memory`). The top floor below the command line: it may import every layer beneath it."""
