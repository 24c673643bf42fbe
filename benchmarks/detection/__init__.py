"""Detection benchmark: do shockmon's alerts come before real training phase transitions, and do they beat the
label-free detectors a user would otherwise run?

``python -m benchmarks.detection`` trains every case (one module per family: :mod:`.grokking`, :mod:`.eos`,
:mod:`.catapult`, :mod:`.condensation`, :mod:`.spikes`, :mod:`.controls`) for seeds 0--5 through ``Trainer`` +
a default ``ShockMonitor`` on one CPU thread, recording the run's metrics and what the monitor's tracker was fed
(:mod:`.record`); finds each run's transitions by a rule fixed in the case's module; runs the baselines
(:mod:`.baselines`) on the same runs' series; chooses each baseline's threshold on seeds 0--2 by one rule and
scores every detector on seeds 3--5 (:mod:`.scoring`); prints the tables and writes ``detection.json``,
``detection.md`` and one PNG per case (:mod:`.plots`) to ``benchmarks/results``.

``--quick`` (one seed, shortened runs) checks the pipeline in CI, not the scores. ``--cached`` reuses the
recordings under ``benchmarks/detection/.cache`` (git-ignored) with their live events; ``--replay`` feeds them
to the current tracker instead (offline iteration on the tracker; the quick mode checks that a replay gives the
live monitor's events exactly). ``python -m benchmarks.detection.evidence`` (:mod:`.evidence`) prints, from the
same recordings, why no alert comes before an edge of stability or a catapult.
"""
