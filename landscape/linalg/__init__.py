"""Algorithms over a symmetric matvec or a value-and-gradient callable, testable on explicit matrices: Lanczos
(:mod:`.lanczos`), trace estimators (:mod:`.trace`: Hutchinson, Hutch++, deflated), stochastic Lanczos quadrature
(:mod:`.density`), Auto-PGD ascent (:mod:`.ascent`), with the long-vector storage they share (:mod:`.vectors`) and
the counter-based random draws (:mod:`.draws`). Imports only :mod:`landscape.errors` and :mod:`landscape.runtime`:
no model, no Problem, no run file."""
